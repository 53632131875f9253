"""Rank-side bodies and tiny transformers configs for tests/test_hf.py (transformers' own blocks and models
are the reference; nothing of ours computes it)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_dist.models.hf import from_hf_block, parallelize_hf_model, to_hf_state_dict

D = 16
NO_AUX = dict(aux_loss_coef=0.0, seq_aux_loss_coef=0.0, z_loss_coef=0.0)
"""Balancing off: the block's own gradients are compared (the aux terms are tested against HF apart)."""


HF_TINY = {
    "model_type": "qwen3_moe",
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "max_position_embeddings": 64,
}
"""A tiny Qwen3-MoE ``model.hf_config`` for the trainer (model.kind=hf), as a user writes it inline."""


def tiny_config(kind: str):
    """A tiny config of each supported model type, experts_implementation eager (works in fp64)."""
    import transformers as tf

    common = dict(
        hidden_size=D, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, vocab_size=256
    )
    if kind == "mixtral":
        cfg = tf.MixtralConfig(**common, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2)
    elif kind == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(
            **common,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=20,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        )
    elif kind == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(
            **common,
            moe_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            head_dim=8,
        )
    elif kind == "olmoe":
        cfg = tf.OlmoeConfig(**common, intermediate_size=24, num_experts=8, num_experts_per_tok=2)
    elif kind == "deepseek_v3":
        cfg = tf.DeepseekV3Config(
            **common,
            intermediate_size=32,
            moe_intermediate_size=24,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=8,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
        )
    else:
        raise ValueError(kind)
    cfg._experts_implementation = "eager"
    return cfg


BLOCKS = {
    "mixtral": ("transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock"),
    "qwen2_moe": ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock"),
    "qwen3_moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    "olmoe": ("transformers.models.olmoe.modeling_olmoe", "OlmoeSparseMoeBlock"),
    "deepseek_v3": ("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3MoE"),
}


def make_block(kind: str, seed: int = 0, dtype=torch.float64):
    """The transformers block with random weights (drawn from ``seed``, the same on every rank)."""
    import importlib

    module, name = BLOCKS[kind]
    block = getattr(importlib.import_module(module), name)(tiny_config(kind))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in sorted(block.named_parameters()):
            scale = 0.5 if pname == "gate.weight" else 1 / math.sqrt(p.shape[-1])
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)
        if kind == "deepseek_v3":  # a nonzero selection bias, so that it is seen to steer the choice
            block.gate.e_score_correction_bias.copy_(torch.randn(8, generator=g, dtype=torch.float64) * 0.1)
    return block.to(dtype)


def block_inputs(tokens: list[int], seed: int, dtype=torch.float64) -> tuple[list, list]:
    """Per-rank [B=1, S=n, D] inputs and output cotangents."""
    g = torch.Generator().manual_seed(1000 + seed)
    xs = [torch.randn(1, n, D, generator=g, dtype=torch.float64).to(dtype) for n in tokens]
    cots = [torch.randn(1, n, D, generator=g, dtype=torch.float64).to(dtype) for n in tokens]
    return xs, cots


def block_case_worker(rank: int, world: int, kinds: list[str], tokens: list[int], flat: bool = False) -> dict:
    """Our layer from each block, forward + backward of <h, cot> on this rank's tokens. ``flat``: [T, D]."""
    group = dist.group.WORLD if world > 1 else None
    results = {}
    for i, kind in enumerate(kinds):
        block = make_block(kind, seed=i)
        layer = from_hf_block(block, group, group, layer_idx=i, **NO_AUX)
        xs, cots = block_inputs(tokens, seed=i)
        x = xs[rank].clone()
        if flat:
            x = x[0]
        x.requires_grad_()
        out = layer(x)
        (out.hidden * cots[rank].reshape_as(x)).sum().backward()
        res = {
            "hidden": out.hidden.detach().reshape(1, -1, D),
            "grad_x": x.grad.reshape(1, -1, D),
            "grad_router": layer.router.weight.grad,
            "grad_w1": layer.experts.w1.grad,
            "grad_w2": layer.experts.w2.grad,
            "state": to_hf_state_dict(layer),  # gathered: every rank holds every expert
        }
        if layer.shared_experts is not None:
            se = layer.shared_experts
            res["grad_ws1"], res["grad_ws2"] = se.w1.grad, se.w2.grad
            res["grad_wg"] = se.gate.grad if se.gate is not None else None
        results[kind] = res
    return results


def lm_worker(rank: int, world: int, ep: int, batches: list, seed: int) -> dict:
    """A tiny Qwen3-MoE LM, parallelised over EP=ep x DP=world/ep; one step's logits, loss and synced grads
    (the torch engine's sync rule) on this rank's batch."""
    from transformers import AutoModelForCausalLM

    from moe_dist.models.hf import HFCausalLM
    from moe_dist.moe.parallel import ParallelLayout
    from moe_dist.training.config import config_from_dict
    from moe_dist.training.engine import TorchEngine

    layout = ParallelLayout.build(ep)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe")).double()
    model = HFCausalLM(parallelize_hf_model(hf, layout, **NO_AUX))
    cfg = config_from_dict({"parallel": {"ep": ep}, "model": {"moe": {"num_experts": 8}}})
    engine = TorchEngine(model, cfg, layout, torch.device("cpu"))
    x, y = batches[rank]
    out = model(x)
    loss = F.cross_entropy(out.logits_BSV.reshape(-1, 256), y.reshape(-1))
    loss.backward()
    engine.sync_grads()
    return {
        "logits": out.logits_BSV.detach(),
        "loss": loss.detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "ep_rank": layout.ep_rank,
    }


def world4_worker(
    rank: int, world: int, kinds: list[str], tokens: list[int], batches: list, seed: int
) -> dict:
    """The world-4 block cases (EP=4) and the LM case (EP=2 x DP=2) in one spawn."""
    return {
        "blocks": block_case_worker(rank, world, kinds, tokens),
        "lm": lm_worker(rank, world, 2, batches, seed),
    }
