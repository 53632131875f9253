"""Memory per rank: what a layout will need (the planner, ``python -m moe_dist.plan``) and what a run used
(``memory_per_rank`` in summary.json). Both count the same things, so they can be compared exactly:

- ``params``: bytes of the model's parameters held by the rank;
- ``grads``: bytes of the gradients the rank holds after backward (parameter-shaped, fp32; under DeepSpeed
  ZeRO-2 the fp32 partitions its AdamW steps on);
- ``optimizer``: bytes of AdamW's state tensors (``exp_avg``, ``exp_avg_sq``; the per-tensor ``step``
  counters are not counted);
- ``master``: DeepSpeed ZeRO's fp32 master partition (0 for the other engines);
- the activations: the planner's estimate per micro-batch (``activation_bytes``) against the measured
  ``activations_peak`` (moe_dist/training/saved_tensors.py), the bytes saved for backward.

Parameters are counted on the meta device (shapes only, no memory, no weights): our byte LM from the run
config, or a transformers model from ``model.hf_config`` (every ``HFFamily`` of
moe_dist/models/hf_families.py; its routed experts are the parameters under a ``.experts.`` module, shared
experts and routers are dense).

Shape legend: T tokens per micro-batch per rank, D model dim, N routed experts, K top-k,
F expert ffn dim, V vocabulary.
"""

from __future__ import annotations

import resource
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moe_dist.errors import ConfigError
from moe_dist.moe.sync import expert_params
from moe_dist.training.config import RunConfig
from moe_dist.training.saved_tensors import activations_peak
from moe_dist.training.saved_tensors import count_saved as count_saved  # the trainer's, re-exported

ENGINES = ("torch", "fsdp", "deepspeed")
FP32 = 4
ADAM_MOMENTS = 2
"""exp_avg and exp_avg_sq, each fp32 and parameter-shaped."""


@dataclass(frozen=True)
class ModelCounts:
    """Element counts of a model, all experts included (what a single process would hold), and the widths
    its forward saves for backward per token (the activation estimate)."""

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
    """Saved per routed (token, expert) pair by an expert: its first projection's output (2F gated, else F)
    and its activation's (gated: act(gate) and the product, 2F; else F)."""
    dense_width: int
    """The same per token for a dense FFN block."""
    attn_width: int
    """Saved per token per layer by attention, its norm excluded: the projections' outputs, the rotated q
    and k (HF), the attention output and its log-sum-exp (one per head)."""
    vocab: int
    seq_len: int
    shared_width: int = 0
    """The same per token for the shared experts (one FFN of all their hidden units)."""
    dense_groups: tuple[int, int] = (0, 0)
    """Dense parameters by optimizer group (matrices with weight decay, the rest without): DeepSpeed pads
    and partitions each group on its own."""
    expert_groups: tuple[int, int] = (0, 0)
    """The same for the routed experts (all N)."""


def _groups(params: list[nn.Parameter]) -> tuple[int, int]:
    """(decay, no_decay) elements, as ``engine.param_groups`` splits them (matrices decay)."""
    decay = sum(p.numel() for p in params if p.dim() >= 2)
    return decay, sum(p.numel() for p in params) - decay


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


def _hf_attn_width(config) -> int:
    """``ModelCounts.attn_width`` of a transformers attention (sdpa). Grouped-query attention (Qwen3,
    Mixtral, ...): q, k, v projections, q/k RMSNorm (Qwen3: normalized rows + one rsqrt per head), rotated
    q and k, the output and one log-sum-exp per head; measured equal on a tiny Qwen3-MoE. Multi-head latent
    attention (DeepSeek-V3): the low-rank q and kv projections with their norms, the expanded q, k, v, the
    output and the log-sum-exp (written from transformers' DeepseekV3Attention; the whole estimate of
    configs/deepseek_v3_tiny.yaml came out 2.6% above its measured peak)."""
    heads = config.num_attention_heads
    if getattr(config, "kv_lora_rank", None):  # MLA
        qk = config.qk_nope_head_dim + config.qk_rope_head_dim
        q_lora = getattr(config, "q_lora_rank", None) or 0
        low_rank = (3 * q_lora + 1 if q_lora else 0) + 3 * config.kv_lora_rank + config.qk_rope_head_dim + 1
        expanded = heads * qk * 3 + heads * (
            config.qk_nope_head_dim + config.v_head_dim
        )  # q, k (roped), kv_b
        return low_rank + expanded + 2 * heads * config.v_head_dim + heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    q, kv = heads * head_dim, kv_heads * head_dim
    qk_norm = q + kv + heads + kv_heads if config.model_type.startswith("qwen3") else 0
    return (q + 2 * kv) + (q + kv) + q + heads + qk_norm


def _hf_counts(cfg: RunConfig) -> ModelCounts:
    from transformers import AutoModelForCausalLM

    from moe_dist.models.hf_families import BY_CLASS

    config = _hf_config(cfg.model.hf_source)
    with torch.device("meta"):  # why meta: shapes only, so a 30B model costs nothing here
        model = AutoModelForCausalLM.from_config(config)
    blocks = [m for m in model.modules() if type(m).__name__ in BY_CLASS]
    if not blocks:
        raise ConfigError(f"model.hf_config ({config.model_type}) has no supported sparse-MoE block")
    experts = [p for n, p in model.named_parameters() if ".experts." in f".{n}"]
    ids = {id(p) for p in experts}
    dense = [p for p in model.parameters() if id(p) not in ids]
    num = next(
        getattr(config, k)
        for k in ("num_local_experts", "num_experts", "n_routed_experts")
        if isinstance(getattr(config, k, None), int)
    )
    top_k = next(getattr(config, k) for k in ("num_experts_per_tok", "top_k") if hasattr(config, k))
    f_moe = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    shared = (getattr(config, "n_shared_experts", None) or 0) * f_moe
    shared = shared or getattr(config, "shared_expert_intermediate_size", None) or 0
    return ModelCounts(
        dense=sum(p.numel() for p in dense),
        expert=sum(p.numel() for p in experts),
        num_experts=num,
        moe_layers=len(blocks),
        dense_layers=config.num_hidden_layers - len(blocks),
        d_model=config.hidden_size,
        top_k=top_k,
        expert_width=4 * f_moe,  # HF's MoE families are gated (gate and up, act(gate), the product)
        dense_width=4 * config.intermediate_size,
        attn_width=_hf_attn_width(config),
        vocab=config.vocab_size,
        seq_len=cfg.model.seq_len,
        shared_width=4 * shared,
        dense_groups=_groups(dense),
        expert_groups=_groups(experts),
    )


def model_counts(cfg: RunConfig) -> ModelCounts:
    """Parameter counts of the run config's model, from its shapes alone."""
    if cfg.model.kind == "hf":
        return _hf_counts(cfg)
    from moe_dist.models.transformer import VOCAB, MoETransformer
    from moe_dist.moe.experts import hidden_width

    m, moe = cfg.model, cfg.model.moe
    with torch.device("meta"):
        model = MoETransformer(m)
    experts = expert_params(model)
    ids = {id(p) for p in experts}
    dense = [p for p in model.parameters() if id(p) not in ids]
    n_moe = sum(1 for i in range(m.n_layers) if (i + 1) % m.moe_every == 0)
    act = 2 if moe.gated else 1  # gated: act(gate) and the product; else the activation's output

    def ffn(width: int) -> int:
        return hidden_width(width, moe.activation) + act * width

    shared = moe.num_shared_experts * (moe.shared_d_ff or moe.d_ff)
    return ModelCounts(
        dense=sum(p.numel() for p in dense),
        expert=sum(p.numel() for p in experts),
        num_experts=moe.num_experts,
        moe_layers=n_moe,
        dense_layers=m.n_layers - n_moe,
        d_model=m.d_model,
        top_k=moe.top_k,
        expert_width=ffn(moe.d_ff),
        dense_width=2 * m.d_ff_dense,  # up's output and the GELU's
        attn_width=4 * m.d_model + m.n_heads,  # q, k, v (one tensor), the output, a log-sum-exp per head
        vocab=m.vocab_size or VOCAB,  # 0: bytes (the launch fills in the data's vocabulary)
        seq_len=m.seq_len,
        shared_width=ffn(shared) if shared else 0,
        dense_groups=_groups(dense),
        expert_groups=_groups(experts),
    )


DTYPES = ("fp32", "bf16")


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
    master: int = 0
    """fp32 master weights held beside ``params``: DeepSpeed ZeRO's fp32 partition (a copy even when the
    model is fp32), or its bf16 optimizer's full fp32 copy at ZeRO 0."""
    dtype: str = "fp32"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _shard(n: int, dense: int, expert: int, world: int, edp: int) -> int:
    """Bytes of ``n`` per element when dense state is split over the world and expert state over the
    expert-data-parallel group (ceil: the largest shard, the one that decides whether a rank fits)."""
    return n * (-(-dense // world) + -(-expert // edp))


def zero_partition(numel: int, dp: int) -> int:
    """Elements of one rank's ZeRO 1/2 partition of a flat parameter group of ``numel`` over ``dp`` ranks:
    DeepSpeed 0.19.8 (runtime/zero/stage_1_and_2.py) pads the group to a multiple of
    ``nccl_start_alignment_factor`` (2) x dp and splits it evenly (``parameter_alignment`` off: its
    default)."""
    align = 2 * dp
    return -(-numel // align) * align // dp


def activation_bytes(c: ModelCounts, tokens: int, ep: int, act: int) -> int:
    """The planner's activation estimate: bytes saved for backward by one micro-batch of ``tokens`` tokens
    on a rank (``SavedTensorsPeak`` measures the same), ``act`` bytes per activation element (fp32: 4,
    bf16 autocast: 2), uniform routing."""
    D, K, N = c.d_model, c.top_k, c.num_experts
    layers = c.moe_layers + c.dense_layers
    # each RMSNorm keeps its input, the normalized rows (its weight's gradient), one rsqrt per token and
    # its output, the next projection's input: fp32 under autocast too (the residual stream is fp32)
    norm = 3 * D + 1
    f32 = (2 * layers + 1) * norm + c.moe_layers * (2 * N + 1 + K) + c.vocab  # router; log-softmax (fp32)
    low = layers * c.attn_width + c.dense_layers * c.dense_width
    low += c.moe_layers * (K * (2 * D + c.expert_width) + c.shared_width)  # permuted and combined rows
    if act < FP32:
        low += (2 * layers + 1) * D  # the projections' low-precision copies of each norm's output
    # token ids and targets; each MoE layer's top-K indices, and under EP the permutation's two
    int64 = 2 + c.moe_layers * K * (3 if ep > 1 else 1)
    return tokens * (FP32 * f32 + act * low + 8 * int64)


def plan(
    cfg: RunConfig, world: int, ep: int, engine: str = "torch", zero: int = 0, dtype: str | None = None
) -> Plan:
    """Bytes per rank of ``cfg`` at ``world`` ranks and EP size ``ep`` under ``engine``.

    ``dtype``: "fp32" (what CPU runs do), or "bf16" (CUDA with ``train.bf16``, the default when the config
    has it on): bf16 activations under every engine; DeepSpeed then keeps bf16 parameters (and gradients at
    ZeRO 0/1) beside its fp32 master partition; the torch engine (autocast) and fsdp (MixedPrecisionPolicy:
    bf16 compute, fp32 sharded parameters and reduce) keep fp32 parameters and gradients.

    torch: nothing sharded. deepspeed ZeRO-1: the AdamW state and its fp32 master weights split (dense over
    the world, experts over their expert-data-parallel group; ``zero_partition``'s padding, per optimizer
    group), ZeRO-2: the gradients too (the fp32 partition its AdamW steps on). fsdp: parameters, gradients
    and AdamW state all split so (torchtitan's dense FSDP + ``efsdp``)."""
    if engine not in ENGINES:
        raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if world < 1 or ep < 1 or world % ep:
        raise ConfigError(f"--world {world} must be a positive multiple of --ep {ep}")
    if zero not in (0, 1, 2) or (zero and engine != "deepspeed"):
        raise ConfigError(f"--zero {zero}: ZeRO stages 0, 1, 2 apply to --engine deepspeed only")
    dtype = dtype or ("bf16" if cfg.train.bf16 else "fp32")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    c = model_counts(cfg)
    if c.num_experts % ep:
        raise ConfigError(f"num_experts={c.num_experts} is not divisible by --ep {ep}")
    slots = c.num_experts // ep + cfg.parallel.redundant_experts
    expert = c.expert // c.num_experts * slots
    edp = world // ep
    bf16 = dtype == "bf16"
    rank_params = c.dense + expert
    full = FP32 * rank_params
    params, grads, opt, master = full, full, ADAM_MOMENTS * full, 0
    if engine == "fsdp":
        params = _shard(FP32, c.dense, expert, world, edp)
        grads, opt = params, ADAM_MOMENTS * params
    elif engine == "deepspeed":
        params = (2 if bf16 else FP32) * rank_params  # the model's own (bit16) parameters
        if zero >= 1:
            part = sum(zero_partition(n, world) for n in c.dense_groups)
            part += sum(zero_partition(n // c.num_experts * slots, edp) for n in c.expert_groups)
            opt, master = ADAM_MOMENTS * FP32 * part, FP32 * part
            grads = FP32 * part if zero == 2 else params
        elif bf16:  # ZeRO 0 in bf16: DeepSpeed's BF16_Optimizer, an fp32 copy and fp32 gradients of all
            master = full
    t = cfg.train
    act = 2 if bf16 else FP32
    T = t.micro_batch * c.seq_len
    # uniform routing: (ep-1)/ep of the K*T rows leave the rank, 4 times (dispatch, combine, their grads)
    a2a = 4 * c.moe_layers * t.grad_accum * c.top_k * T * c.d_model * act * (ep - 1) // ep
    return Plan(
        engine,
        world,
        ep,
        zero,
        c.dense + c.expert,
        rank_params,
        params,
        grads,
        opt,
        activation_bytes(c, T, ep, act),
        a2a,
        master,
        dtype,
    )


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank holds of ``t``: a DTensor's local shard (``engine: fsdp``), else the tensor."""
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def grad_bytes(model: nn.Module) -> int:
    """Bytes of the gradients the model's parameters hold now."""
    return sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)


def _torch_optimizer(optimizer: Any) -> Any:
    """A wrapper (DeepSpeed's ZeRO optimizer) looked through to the torch optimizer it steps."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_bytes(optimizer: Any) -> int:
    """Bytes of the optimizer's state tensors, ``step`` counters excepted. A wrapper (DeepSpeed's ZeRO
    optimizer) is looked through to the torch optimizer it steps (``.optimizer``)."""
    optimizer = _torch_optimizer(optimizer)
    return sum(
        local_bytes(v)
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
    calls it). ``grads`` is the largest ``grad_bytes`` seen after a backward; where the engine keeps
    gradients outside the parameters (DeepSpeed's ZeRO), the partitions its optimizer stepped on
    (``zero_memory``), else None. Also ``master`` (``zero_memory``) and ``activations_peak``."""
    params = sum(local_bytes(p) for p in model.parameters())
    values = torch.tensor([params, grads, optimizer_bytes(optimizer), peak_bytes(device)], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    params, grads, opt, peak = (int(v) for v in values.tolist())
    key = "peak_allocated" if device.type == "cuda" else "peak_rss"
    out = {"params": params, "grads": grads or None, "optimizer": opt, key: peak}
    return out | activations_peak(model, device) | zero_memory(optimizer, device)


_STEPPED: weakref.WeakKeyDictionary[Any, dict[int, int]] = weakref.WeakKeyDictionary()
"""torch optimizer -> {id(parameter): the most gradient bytes it was stepped with} (``watch_step_grads``)."""


def watch_step_grads(optimizer: Any) -> None:
    """Record the gradients the torch optimizer inside ``optimizer`` steps on, for ``zero_memory``.

    why: DeepSpeed's ZeRO keeps no gradient in the model's parameters; it steps AdamW on one flat fp32
    partition per parameter group, its ``.grad`` set just before that group's step and freed after, so a
    step pre-hook is the one place they can be counted."""
    inner = _torch_optimizer(optimizer)
    seen = _STEPPED.setdefault(inner, {})

    def record(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in opt.param_groups:  # ZeRO steps one group at a time (the others set aside)
            for p in group["params"]:
                if p.grad is not None:
                    seen[id(p)] = max(seen.get(id(p), 0), p.grad.numel() * p.grad.element_size())

    inner.register_step_pre_hook(record)


def zero_memory(optimizer: Any, device: torch.device) -> dict[str, int]:
    """``master``: bytes of DeepSpeed ZeRO 1/2's fp32 master partition (``single_partition_of_fp32_groups``,
    a copy even when the model is fp32; 0 for other optimizers); ``grads``, where ``watch_step_grads`` saw
    any: the gradient partitions the optimizer stepped on. Maxima over ranks (a collective)."""
    fp32_partitions = getattr(optimizer, "single_partition_of_fp32_groups", [])
    master = sum(t.numel() * t.element_size() for t in fp32_partitions)
    stepped = _STEPPED.get(_torch_optimizer(optimizer), {})
    values = torch.tensor([master, sum(stepped.values())], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    master, grads = (int(v) for v in values.tolist())
    return {"master": master} | ({"grads": grads} if grads else {})


def format_plan(p: Plan) -> str:
    """The planner's table (bytes and GiB per rank)."""
    rows = [
        ("parameters", p.params),
        ("gradients", p.grads),
        ("optimizer (AdamW moments)", p.optimizer),
        ("fp32 master weights", p.master),
        ("states total", p.params + p.grads + p.optimizer + p.master),
        ("activations per micro-batch (estimate)", p.activations_per_micro_batch),
        ("all-to-all sent per step", p.all_to_all_per_step),
    ]
    zero = f" ZeRO-{p.zero}" if p.engine == "deepspeed" else ""
    head = (
        f"engine {p.engine}{zero}, {p.dtype}, world {p.world} = EP {p.ep} x DP {p.world // p.ep}; "
        f"{p.total_params / 1e9:.3f}B params, {p.rank_params / 1e9:.3f}B on each rank before sharding"
    )
    width = max(len(r[0]) for r in rows)
    lines = [head, f"{'per rank':<{width}}  {'bytes':>16}  {'GiB':>9}"]
    lines += [f"{name:<{width}}  {b:>16,d}  {b / 2**30:>9.2f}" for name, b in rows]
    return "\n".join(lines)
