"""Fixtures and the rank-side body for tests/models/test_hf_load.py: tiny transformers checkpoints written
with ``save_pretrained`` (the per-expert layout) or by hand in the fused layout, several shards each."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SHARD = "20KB"
"""max_shard_size of the fixtures: each spans several shards."""


def save_fixture(
    kind: str, out: Path, seed: int = 0, shard: str = SHARD, dtype: torch.dtype = torch.float32
) -> Path:
    """A tiny ``kind`` model from ``from_config`` (seeded), saved with ``save_pretrained``: transformers
    writes the published per-expert keys (``shard``: max_shard_size; "1GB": one model.safetensors)."""
    from transformers import AutoModelForCausalLM

    from tests.models.hf_workers import tiny_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), dtype=dtype)
    if kind == "deepseek_v3":  # a nonzero selection bias must be read too
        for block in (m for m in model.modules() if type(m).__name__ == "DeepseekV3MoE"):
            block.gate.e_score_correction_bias.normal_(0, 0.1)
    model.save_pretrained(out, max_shard_size=shard)
    return out


def save_fused(src: Path, out: Path, shards: int = 3) -> Path:
    """``src``'s model re-saved in transformers 5.x's in-memory (fused) layout, by hand, in ``shards`` files
    with an index: ``experts.gate_up_proj`` [N, 2F, D] and ``experts.down_proj`` [N, D, F]."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    out.mkdir(parents=True)
    (out / "config.json").write_text((src / "config.json").read_text())
    keys = sorted(sd)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: sd[k] for k in part}, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def load_worker(rank: int, world: int, ep: int, cases: list[tuple[str, int]], tokens: list) -> list[dict]:
    """Each (checkpoint dir, redundant experts) loaded at EP ``ep`` x DP world/ep: this rank's logits on its
    own tokens, what it read, and which experts its slots hold."""
    from moe_dist.models.hf import HFCausalLM
    from moe_dist.models.hf_config import hf_num_experts
    from moe_dist.models.hf_load import load_pretrained, pretrained_skeleton
    from moe_dist.moe.parallel import ParallelLayout
    from moe_dist.moe.placement import Placement

    layout = ParallelLayout.build(ep)
    out = []
    for path, redundant in cases:
        model = pretrained_skeleton(path)
        placement = Placement.contiguous(hf_num_experts(path), ep, redundant)
        stats = load_pretrained(model, path, layout, placement)
        lm = HFCausalLM(model).eval()
        with torch.no_grad():
            logits = lm(tokens[rank]).logits_BSV
        out.append(
            {
                "logits": logits,
                "bytes_read": stats.bytes_read,
                "checkpoint_bytes": stats.checkpoint_bytes,
                "experts": sorted(set(placement.slot_expert_RL[layout.ep_rank])),
            }
        )
    return out


def trainer_worker(rank: int, world: int, cfg_dict: dict, tokens) -> dict:
    """The trainer with model.hf_pretrained (as the entry point builds it): its model's logits on
    ``tokens`` before any step and its MoE layers' configs, then the run (which writes the load record)."""
    import dataclasses

    from moe_dist.moe.layer import moe_layers
    from moe_dist.moe.parallel import ParallelLayout
    from moe_dist.training.config import config_from_dict
    from moe_dist.training.trainer import Trainer

    cfg = config_from_dict(cfg_dict)
    trainer = Trainer(cfg, ParallelLayout.build(cfg.parallel.ep), torch.device("cpu"))
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(tokens).logits_BSV
    trainer.model.train()
    layers = [dataclasses.asdict(m.cfg) for m in moe_layers(trainer.model)]
    return {"logits": logits, "layers": layers, "summary": trainer.train()}


def convert_worker(rank: int, world: int, cfg_dicts: list[dict]) -> list[dict]:
    """Conversion runs (``train.steps=0``), one after the other: each run's summary."""
    from moe_dist.moe.parallel import ParallelLayout
    from moe_dist.training.config import config_from_dict
    from moe_dist.training.trainer import Trainer

    out = []
    for cfg_dict in cfg_dicts:
        cfg = config_from_dict(cfg_dict)
        out.append(Trainer(cfg, ParallelLayout.build(cfg.parallel.ep), torch.device("cpu")).train())
    return out


def both_worker(rank: int, world: int, load_args: tuple, trainer_args: tuple, convert: list[dict]) -> dict:
    """``load_worker``, ``trainer_worker`` and ``convert_worker`` in the same ranks (one spawn: each rank
    imports transformers once for every test)."""
    loads = load_worker(rank, world, *load_args)
    trained = trainer_worker(rank, world, *trainer_args)
    return {"load": loads, "trainer": trained, "convert": convert_worker(rank, world, convert)}
