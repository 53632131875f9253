"""Memory per rank: what a layout will need (the planner, ``python -m moe_dist.plan``) and what a run used
(``memory_per_rank`` in summary.json). Both count the same things, so they can be compared exactly:

- ``params``: bytes of the model's parameters held by the rank;
- ``grads``: bytes of the gradients the rank holds after backward (parameter-shaped, fp32);
- ``optimizer``: bytes of AdamW's state tensors (``exp_avg``, ``exp_avg_sq``; the per-tensor ``step``
  counters are not counted).

Parameters are counted on the meta device (shapes only, no memory, no weights): our byte LM from the run
config, or a transformers model from ``model.hf_config`` (every ``HFFamily`` of
moe_dist/models/hf_families.py; its routed experts are the parameters under a ``.experts.`` module, shared
experts and routers are dense).

Shape legend: T tokens per micro-batch per rank, D model dim, N routed experts, K top-k,
F expert ffn dim, V vocabulary.
"""

from __future__ import annotations

import resource
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe_dist.errors import ConfigError
from moe_dist.moe.sync import expert_params
from moe_dist.training.config import RunConfig

ENGINES = ("torch", "fsdp", "deepspeed")
FP32 = 4
ADAM_MOMENTS = 2
"""exp_avg and exp_avg_sq, each fp32 and parameter-shaped."""


@dataclass(frozen=True)
class ModelCounts:
    """Element counts of a model, all experts included (what a single process would hold)."""

    dense: int
    """Parameters on every rank: embeddings, attention, norms, dense FFNs, routers, shared experts."""
    expert: int
    """Routed expert parameters, every MoE layer, all N experts."""
    num_experts: int
    moe_layers: int
    dense_layers: int
    d_model: int
    top_k: int
    expert_width: int
    """Columns of an expert's first projection (2F when gated) plus F (its activation output)."""
    dense_width: int
    """The same for a dense FFN block."""
    attn_width: int
    """Per token per layer saved by attention beyond its input: q, k, v widths and 2x the output width."""
    vocab: int
    seq_len: int


def _hf_config(spec: str | dict):
    """The transformers config of ``model.hf_config`` as it is (any vocab: planning needs no corpus)."""
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ConfigError("model.kind=hf needs transformers (pip install -e '.[hf]')") from None
    if not isinstance(spec, dict) and not (Path(spec) / "config.json").is_file():
        raise ConfigError(f"model.hf_config={spec!r} is not a directory with a config.json")
    try:
        if not isinstance(spec, dict):
            return AutoConfig.from_pretrained(spec)
        fields = dict(spec)
        model_type = fields.pop("model_type")
        fields.setdefault("vocab_size", 256)  # as the trainer fills it in (models/hf_config.py)
        return AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # noqa: BLE001 - transformers validates fields with several exception types
        raise ConfigError(f"model.hf_config: {' '.join(str(e).split())}") from None


def _hf_counts(cfg: RunConfig) -> ModelCounts:
    from transformers import AutoModelForCausalLM

    from moe_dist.models.hf_families import BY_CLASS

    config = _hf_config(cfg.model.hf_config)
    with torch.device("meta"):  # why meta: shapes only, so a 30B model costs nothing here
        model = AutoModelForCausalLM.from_config(config)
    blocks = [m for m in model.modules() if type(m).__name__ in BY_CLASS]
    if not blocks:
        raise ConfigError(f"model.hf_config ({config.model_type}) has no supported sparse-MoE block")
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in f".{n}")
    num = next(
        getattr(config, k)
        for k in ("num_local_experts", "num_experts", "n_routed_experts")
        if isinstance(getattr(config, k, None), int)
    )
    top_k = next(getattr(config, k) for k in ("num_experts_per_tok", "top_k") if hasattr(config, k))
    d, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    f_moe = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return ModelCounts(
        dense=sum(p.numel() for p in model.parameters()) - expert,
        expert=expert,
        num_experts=num,
        moe_layers=len(blocks),
        dense_layers=config.num_hidden_layers - len(blocks),
        d_model=d,
        top_k=top_k,
        expert_width=3 * f_moe,  # HF's MoE families are gated (gate and up, then the activation)
        dense_width=3 * config.intermediate_size,
        attn_width=3 * heads * head_dim + 2 * kv * head_dim,
        vocab=config.vocab_size,
        seq_len=cfg.model.seq_len,
    )


def model_counts(cfg: RunConfig) -> ModelCounts:
    """Parameter counts of the run config's model, from its shapes alone."""
    if cfg.model.kind == "hf":
        return _hf_counts(cfg)
    from moe_dist.models.transformer import VOCAB, MoETransformer

    m, moe = cfg.model, cfg.model.moe
    with torch.device("meta"):
        model = MoETransformer(m)
    expert = sum(p.numel() for p in expert_params(model))
    n_moe = sum(1 for i in range(m.n_layers) if (i + 1) % m.moe_every == 0)
    hidden = 2 * moe.d_ff if moe.gated else moe.d_ff
    return ModelCounts(
        dense=sum(p.numel() for p in model.parameters()) - expert,
        expert=expert,
        num_experts=moe.num_experts,
        moe_layers=n_moe,
        dense_layers=m.n_layers - n_moe,
        d_model=m.d_model,
        top_k=moe.top_k,
        expert_width=hidden + moe.d_ff,
        dense_width=2 * m.d_ff_dense,
        attn_width=5 * m.d_model,  # qkv (3D), the attention output and proj's input (2D)
        vocab=m.vocab_size or VOCAB,  # 0: bytes (the launch fills in the data's vocabulary)
        seq_len=m.seq_len,
    )


@dataclass(frozen=True)
class Plan:
    """Bytes per rank (every rank holds the same with contiguous placement)."""

    engine: str
    world: int
    ep: int
    zero: int
    total_params: int
    """Elements of the whole model (all experts)."""
    rank_params: int
    """Elements this rank holds unsharded (dense + its expert slots)."""
    params: int
    grads: int
    optimizer: int
    activations_per_micro_batch: int
    all_to_all_per_step: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _shard(n: int, dense: int, expert: int, world: int, edp: int) -> int:
    """Bytes of ``n`` per element when dense state is split over the world and expert state over the
    expert-data-parallel group (ceil: the largest shard, the one that decides whether a rank fits)."""
    return n * (-(-dense // world) + -(-expert // edp))


def plan(cfg: RunConfig, world: int, ep: int, engine: str = "torch", zero: int = 0) -> Plan:
    """Bytes per rank of ``cfg`` at ``world`` ranks and EP size ``ep`` under ``engine``.

    torch: nothing sharded. deepspeed ZeRO-1: the AdamW state split (dense over the world, experts over
    their expert-data-parallel group), ZeRO-2: the gradients too (ZeRO's fp32 master partition in fp32
    training, bucket padding and alignment are not counted). fsdp: parameters, gradients and AdamW state
    all split so (torchtitan's dense FSDP + ``efsdp``)."""
    if engine not in ENGINES:
        raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if world < 1 or ep < 1 or world % ep:
        raise ConfigError(f"--world {world} must be a positive multiple of --ep {ep}")
    if zero not in (0, 1, 2) or (zero and engine != "deepspeed"):
        raise ConfigError(f"--zero {zero}: ZeRO stages 0, 1, 2 apply to --engine deepspeed only")
    c = model_counts(cfg)
    if c.num_experts % ep:
        raise ConfigError(f"num_experts={c.num_experts} is not divisible by --ep {ep}")
    slots = c.num_experts // ep + cfg.parallel.redundant_experts
    expert = c.expert // c.num_experts * slots
    edp = world // ep
    full = FP32 * (c.dense + expert)
    params, grads, opt = full, full, ADAM_MOMENTS * full
    if engine == "fsdp":
        params = _shard(FP32, c.dense, expert, world, edp)
        grads, opt = params, ADAM_MOMENTS * params
    elif engine == "deepspeed" and zero >= 1:
        opt = _shard(ADAM_MOMENTS * FP32, c.dense, expert, world, edp)
        if zero == 2:
            grads = _shard(FP32, c.dense, expert, world, edp)
    t = cfg.train
    act = 2 if t.bf16 else FP32  # bf16 autocast (CUDA), fp32 otherwise
    T = t.micro_batch * c.seq_len
    D, K = c.d_model, c.top_k
    # saved for backward, per token: each layer's two norm inputs and attention; an MoE layer's router
    # scores (2N), its K permuted and combined rows (3KD, +KD received under EP) and expert hiddens; a dense
    # FFN's hiddens; the final norm and the logits with their log-softmax (2V)
    moe_row = 2 * c.num_experts + K * (3 * D + c.expert_width) + (K * D if ep > 1 else 0)
    layer = 2 * D + c.attn_width
    per_token = (
        (c.moe_layers + c.dense_layers) * layer
        + c.moe_layers * moe_row
        + c.dense_layers * (D + c.dense_width)
        + D
        + 2 * c.vocab
    )
    # uniform routing: (ep-1)/ep of the K*T rows leave the rank, 4 times (dispatch, combine, their grads)
    a2a = 4 * c.moe_layers * t.grad_accum * K * T * D * act * (ep - 1) // ep
    return Plan(
        engine,
        world,
        ep,
        zero,
        c.dense + c.expert,
        c.dense + expert,
        params,
        grads,
        opt,
        T * per_token * act,
        a2a,
    )


def grad_bytes(model: nn.Module) -> int:
    """Bytes of the gradients the model's parameters hold now."""
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


def optimizer_bytes(optimizer: Any) -> int:
    """Bytes of the optimizer's state tensors, ``step`` counters excepted. A wrapper (DeepSpeed's ZeRO
    optimizer) is looked through to the torch optimizer it steps (``.optimizer``)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for k, v in state.items()
        if k != "step" and torch.is_tensor(v)
    )


def peak_bytes(device: torch.device) -> int:
    """Peak allocated bytes on a CUDA device; else this process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measured_memory(model: nn.Module, optimizer: Any, grads: int, device: torch.device) -> dict:
    """summary.json's ``memory_per_rank``: the maximum over ranks of each figure (a collective: every rank
    calls it). ``grads`` is the largest ``grad_bytes`` seen after a backward; None when the engine keeps
    gradients outside the parameters (DeepSpeed's ZeRO buckets)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    values = torch.tensor([params, grads, optimizer_bytes(optimizer), peak_bytes(device)], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    params, grads, opt, peak = (int(v) for v in values.tolist())
    key = "peak_allocated" if device.type == "cuda" else "peak_rss"
    return {"params": params, "grads": grads or None, "optimizer": opt, key: peak}


def format_plan(p: Plan) -> str:
    """The planner's table (bytes and GiB per rank)."""
    rows = [
        ("parameters", p.params),
        ("gradients", p.grads),
        ("optimizer (AdamW moments)", p.optimizer),
        ("states total", p.params + p.grads + p.optimizer),
        ("activations per micro-batch (estimate)", p.activations_per_micro_batch),
        ("all-to-all sent per step", p.all_to_all_per_step),
    ]
    zero = f" ZeRO-{p.zero}" if p.engine == "deepspeed" else ""
    head = (
        f"engine {p.engine}{zero}, world {p.world} = EP {p.ep} x DP {p.world // p.ep}; "
        f"{p.total_params / 1e9:.3f}B params, {p.rank_params / 1e9:.3f}B on each rank before sharding"
    )
    width = max(len(r[0]) for r in rows)
    lines = [head, f"{'per rank':<{width}}  {'bytes':>16}  {'GiB':>9}"]
    lines += [f"{name:<{width}}  {b:>16,d}  {b / 2**30:>9.2f}" for name, b in rows]
    return "\n".join(lines)
