"""Hugging Face transformers (5.x) sparse-MoE blocks made expert-parallel.

    layer = from_hf_block(block, ep_group, balance_group)  # a MoELayer computing what ``block`` computes
    model = parallelize_hf_model(model, layout)             # every sparse block of a causal LM swapped
    sd = to_hf_state_dict(layer)                            # experts gathered back into the block's layout

Supported blocks: ``MixtralSparseMoeBlock``, ``Qwen2MoeSparseMoeBlock``, ``Qwen3MoeSparseMoeBlock``,
``OlmoeSparseMoeBlock``, ``DeepseekV3MoE``. In transformers 5.x their experts are fused: ``gate_up_proj``
[N, 2F, D] (gate rows first, then up) and ``down_proj`` [N, D, F], FFN(u) = down(act(gate u) * up u); ours are
``w1`` [L, D, 2F] = [W_gate | W_up] and ``w2`` [L, F, D], i.e. the same matrices transposed.

transformers is an optional extra (``pip install -e ".[hf]"``); it is imported only when a function here
needs it. The rest of a parallelised model stays transformers' own code.

Shape legend: N experts, L local slots (the layer's placement says which expert each holds), D model dim, F
expert ffn dim, H shared ffn width, B sequences, S tokens per sequence, V vocab.

What differs between the families is one ``HFFamily`` row each in ``moe_dist.models.hf_families``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moe_dist.errors import ConfigError
from moe_dist.models.hf_config import STRUCTURAL, hf_config_from
from moe_dist.models.hf_families import BLOCK_KINDS, BY_KIND, HFFamily, family_of
from moe_dist.moe.config import MoEConfig
from moe_dist.moe.layer import MoELayer, MoEOutput, moe_layers
from moe_dist.moe.placement import Placement
from moe_dist.moe.timing import TimingHook

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HFBlockSpec:
    """What ``to_hf_state_dict`` needs to write a layer back in its block's layout."""

    kind: str
    """The family's ``HFFamily.kind``."""
    transposed: bool
    """Experts stored [N, D, 2F] / [N, F, D] (transformers' ``is_transposed``), not [N, 2F, D] / [N, D, F]."""
    block_cls: type
    """The transformers class, to rebuild the block when exporting."""



DEDUP_FROM_TOP_K = 8
"""An HF block routing to at least this many experts per token dispatches with ``dedup`` (a token once per
destination rank) unless ``model.hf_moe`` says otherwise. Why 8: measured (docs/benchmarks.md, bench-dispatch,
2026-12-06) dedup was faster than ``pairs`` at K = 8 in every case (0.67-0.95x) and slower at K = 2
(0.85-1.30x); the published DeepSeek-V3, Qwen3-MoE and OLMoE routers are K = 8, Mixtral's and the tiny test
configs' K = 2 stay ``pairs``. Re-measured after dedup lost its second all-to-all, count exchange and sort:
about even at K = 2 (0.97-1.04x), not never slower, so 8 stands."""


def block_kind(block: nn.Module) -> str:
    return family_of(block).kind


def _activation_name(act: nn.Module | Any) -> str:
    """'silu' or 'gelu' (exact), by evaluating the block's activation on a probe: class names vary."""
    probe = torch.linspace(-4, 4, 33, dtype=torch.float64)
    got = act(probe)
    for name, fn in (("silu", F.silu), ("gelu", F.gelu)):
        if torch.allclose(got, fn(probe), atol=1e-12, rtol=0):
            return name
    raise ConfigError(
        f"expert activation {act!r} is neither silu nor exact gelu; no gated variant of ours fits"
    )


def _shared_mlp(block: nn.Module, fam: HFFamily) -> nn.Module | None:
    return getattr(block, fam.shared_expert, None) if fam.shared_expert else None


def hf_block_config(block: nn.Module, config: Any = None, **overrides: Any) -> MoEConfig:
    """Our MoEConfig for ``block``: its routing and FFN exactly, plus our balancing terms.

    Balancing defaults: Mixtral-style blocks get aux_loss_coef = K * router_aux_loss_coef (HF's
    load_balancing_loss_func is K x our Switch loss, see README), turned on whatever
    ``output_router_logits`` says; DeepSeek-V3 blocks get the paper's bias update (gamma 1e-3) and
    sequence-wise loss (1e-4) and no Switch loss; should an override turn one on, it counts f over the
    unbiased top-K (aux_loss_counts="unbiased", Megatron-Core's DeepSeek-V3 recipe; the other families
    have no bias or group limit, where both count modes agree). ``overrides`` replace any non-structural
    field.
    """
    fam = family_of(block)
    bad = sorted(set(overrides) & set(STRUCTURAL))
    if bad:
        raise ConfigError(
            f"{', '.join(bad)} are read from the {type(block).__name__} itself and cannot be overridden"
        )
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(MoEConfig)})
    if unknown:
        raise ConfigError(f"unknown MoE override(s) {', '.join(unknown)}")
    experts, gate = block.experts, block.gate
    config = config if config is not None else getattr(experts, "config", getattr(block, "config", None))
    transposed = bool(getattr(experts, "is_transposed", False))
    n, d = gate.weight.shape
    d_ff = experts.down_proj.shape[1] if transposed else experts.down_proj.shape[2]
    act = _activation_name(experts.act_fn)
    top_k = int(gate.top_k)
    fields: dict[str, Any] = dict(
        d_model=d,
        d_ff=d_ff,
        num_experts=n,
        top_k=top_k,
        activation={"silu": "swiglu", "gelu": "geglu"}[act],
        residual=False,
        normalize_topk=fam.normalize_topk if fam.normalize_topk is not None else bool(gate.norm_topk_prob),
        score_func=fam.score_func,
    )
    fields.update({name: cast(getattr(gate, attr)) for name, attr, cast in fam.gate_fields})
    shared = _shared_mlp(block, fam)
    if shared is not None:
        if _activation_name(shared.act_fn) != act:
            raise ConfigError(
                "the shared expert's activation differs from the routed experts'; not supported"
            )
        fields.update(
            num_shared_experts=1,
            shared_d_ff=shared.gate_proj.weight.shape[0],
            shared_expert_gate=fam.shared_expert_gate is not None,
        )
    for name in fam.must_be_zero:
        if float(getattr(config, name, 0.0) or 0.0) > 0:
            raise ConfigError(f"{fam.display}'s {name} > 0 is not supported (set it to 0)")
    if fam.switch_from_router_aux:
        fields["aux_loss_coef"] = top_k * float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    fields.update(fam.balance, aux_loss_counts=fam.aux_loss_counts)
    if top_k >= DEDUP_FROM_TOP_K:
        fields["dispatch"] = "dedup"
    fields.update(overrides)
    cfg = MoEConfig(**fields)
    bias = getattr(gate, fam.selection_bias) if fam.selection_bias else None
    if bias is not None and cfg.bias_update_rate == 0 and bool(bias.any()):
        # why: our router adds the selection bias only when it is being trained (bias_update_rate > 0)
        raise ConfigError(
            f"this {fam.display} block has a nonzero {fam.selection_bias}; bias_update_rate=0 would drop it"
        )
    return cfg


def _ours(w: Tensor, transposed: bool) -> Tensor:
    """HF's [N, out, in] (or [N, in, out] when transposed) -> our [N, in, out]."""
    return w if transposed else w.transpose(1, 2)


@torch.no_grad()
def from_hf_block(
    block: nn.Module,
    ep_group=None,
    balance_group=None,
    layer_idx: int = 0,
    config: Any = None,
    timing_hook: TimingHook | None = None,
    placement: Placement | None = None,
    slot_rows: bool = False,
    **overrides: Any,
) -> MoELayer:
    """A MoELayer (residual off) whose ``.hidden`` equals ``block(x)`` for x [B, S, D] or [T, D]; under EP
    each rank copies only the experts of its slots (``placement``; None = contiguous). ``config`` is the
    model's HF config (for ``router_aux_loss_coef``; default: the one the block's experts keep). See
    ``hf_block_config`` for the balancing defaults. ``slot_rows``: the block's expert tensors hold this
    rank's L slots in order, not all N experts (a pretrained load read only those, ``hf_load``).
    """
    fam = family_of(block)
    cfg = hf_block_config(block, config, **overrides)
    layer = MoELayer(cfg, ep_group, balance_group, layer_idx, timing_hook, placement=placement)
    ref = block.gate.weight
    # params only: the layer's fp64 counting buffers must stay fp64 whatever the block's dtype
    for p in layer.parameters():
        p.data = p.data.to(device=ref.device, dtype=ref.dtype)
    layer.to(ref.device)
    transposed = bool(getattr(block.experts, "is_transposed", False))
    ids = layer.slot_experts  # slot s holds expert ids[s] (replicas copy the same expert)
    layer.router.weight.copy_(block.gate.weight)
    rows = slice(None) if slot_rows else ids
    layer.experts.w1.copy_(_ours(block.experts.gate_up_proj[rows], transposed))
    layer.experts.w2.copy_(_ours(block.experts.down_proj[rows], transposed))
    if fam.selection_bias:
        layer.router.expert_bias.copy_(getattr(block.gate, fam.selection_bias))
    shared = _shared_mlp(block, fam)
    if shared is not None and layer.shared_experts is not None:
        se = layer.shared_experts
        se.w1.copy_(torch.cat([shared.gate_proj.weight.t(), shared.up_proj.weight.t()], dim=1))
        se.w2.copy_(shared.down_proj.weight.t())
        if se.gate is not None:
            se.gate.copy_(getattr(block, fam.shared_expert_gate).weight[0])
    layer.hf_spec = HFBlockSpec(fam.kind, transposed, type(block))
    return layer


def _gather_experts(w_L: Tensor, group, placement: Placement) -> Tensor:
    """[L, ...] on each EP rank -> [N, ...] in expert order (each expert from its first replica)."""
    if group is None or dist.get_world_size(group) == 1:
        parts = [w_L.detach()]
    else:
        parts = [torch.empty_like(w_L) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, w_L.detach().contiguous(), group=group)
    L = placement.slots_per_rank
    first_N = [r * L + s for r, s in (placement.owner(e) for e in range(placement.num_experts))]
    return torch.cat(parts).index_select(0, torch.tensor(first_N, device=w_L.device))


def to_hf_state_dict(layer: MoELayer, ep_group=None) -> dict[str, Tensor]:
    """The layer's weights in its block's state-dict layout (keys relative to the block). Under EP this is
    a collective over ``ep_group`` (default: the layer's own), and every rank gets every expert."""
    spec: HFBlockSpec = layer.hf_spec
    fam = BY_KIND[spec.kind]
    group = ep_group if ep_group is not None else getattr(layer.dispatcher, "group", None)
    w1 = _gather_experts(layer.experts.w1, group, layer.placement)
    w2 = _gather_experts(layer.experts.w2, group, layer.placement)
    sd = {
        "gate.weight": layer.router.weight.detach().clone(),
        "experts.gate_up_proj": (w1 if spec.transposed else w1.transpose(1, 2)).contiguous(),
        "experts.down_proj": (w2 if spec.transposed else w2.transpose(1, 2)).contiguous(),
    }
    if fam.selection_bias:
        sd[f"gate.{fam.selection_bias}"] = layer.router.expert_bias.detach().clone()
    se = layer.shared_experts
    if se is not None:
        prefix = f"{fam.shared_expert}."
        gate_DH, up_DH = se.w1.detach().chunk(2, dim=1)
        sd[prefix + "gate_proj.weight"] = gate_DH.t().contiguous()
        sd[prefix + "up_proj.weight"] = up_DH.t().contiguous()
        sd[prefix + "down_proj.weight"] = se.w2.detach().t().contiguous()
        if se.gate is not None:
            sd[f"{fam.shared_expert_gate}.weight"] = se.gate.detach().reshape(1, -1).clone()
    return sd


class HFMoEBlock(nn.Module):
    """Stands where a transformers sparse-MoE block stood and returns what the block returned (the hidden
    states, in 5.x), so the decoder layer's code runs unchanged. The last call's MoEOutput (aux loss, terms,
    routing stats) is kept in ``last`` for the trainer to add and log."""

    def __init__(self, moe: MoELayer) -> None:
        super().__init__()
        self.moe = moe
        self.last: MoEOutput | None = None

    def forward(self, hidden_states: Tensor) -> Tensor:
        out = self.moe(hidden_states)
        self.last = out
        return out.hidden

    @property
    def aux_loss(self) -> Tensor | None:
        return None if self.last is None else self.last.aux_loss


def sparse_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, block) of every supported sparse-MoE block, in module order."""
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ in BLOCK_KINDS]


def _layer_index(name: str, fallback: int) -> int:
    m = re.search(r"layers\.(\d+)\.", name + ".")
    return int(m.group(1)) if m else fallback


def sparse_layer_ids(model: nn.Module) -> list[int]:
    """Decoder-layer index of each sparse-MoE block (DeepSeek-V3's first_k_dense_replace layers are dense)."""
    return [_layer_index(name, i) for i, (name, _) in enumerate(sparse_blocks(model))]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def parallelize_hf_model(
    model: nn.Module,
    layout=None,
    timing_hook: TimingHook | None = None,
    placement: Placement | None = None,
    **overrides: Any,
):
    """Swap every sparse-MoE block of a transformers model for an expert-parallel ``HFMoEBlock`` holding the
    same weights (in place; returns ``model``). ``layout`` is a ``ParallelLayout`` (None: one process);
    ``placement`` the expert placement of every block (None: contiguous).

    transformers' own aux loss is switched off (``output_router_logits = False``): its routers are gone;
    ours is in each block's ``aux_loss`` (sum them with ``hf_aux_loss``).
    """
    ep_group = layout.ep_group if layout is not None else None
    balance_group = layout.balance_group if layout is not None else None
    blocks = sparse_blocks(model)
    if not blocks:
        raise ConfigError(
            f"{type(model).__name__} has no supported sparse-MoE block ({', '.join(BLOCK_KINDS)})"
        )
    config = getattr(model, "config", None)
    for i, (name, block) in enumerate(blocks):
        layer = from_hf_block(
            block, ep_group, balance_group, _layer_index(name, i), config, timing_hook, placement, **overrides
        )
        _set_submodule(model, name, HFMoEBlock(layer))
    if config is not None and getattr(config, "output_router_logits", False):
        log.info("output_router_logits switched off: the MoE layers report their own aux loss")
        config.output_router_logits = False
    return model


def hf_moe_blocks(model: nn.Module) -> list[HFMoEBlock]:
    return [m for m in model.modules() if isinstance(m, HFMoEBlock)]


def hf_aux_loss(model: nn.Module) -> Tensor | None:
    """Sum of the last forward's balancing terms over the parallelised blocks."""
    losses = [b.aux_loss for b in hf_moe_blocks(model) if b.aux_loss is not None]
    return sum(losses[1:], losses[0]) if losses else None


@torch.no_grad()
def unparallelize_hf_model(model: nn.Module) -> nn.Module:
    """The inverse of ``parallelize_hf_model``: each HFMoEBlock becomes its transformers block again, with
    every expert (a collective over the EP group when there is one). In place; returns ``model``."""
    config = getattr(model, "config", None)
    for name, m in list(model.named_modules()):
        if not isinstance(m, HFMoEBlock):
            continue
        spec: HFBlockSpec = m.moe.hf_spec
        block = spec.block_cls(config)
        ref = m.moe.router.weight
        block.to(device=ref.device, dtype=ref.dtype)
        block.load_state_dict(to_hf_state_dict(m.moe), strict=True)
        _set_submodule(model, name, block)
    return model


# --- the trainer's model.kind=hf ------------------------------------------------------------------------


def build_hf_model(spec: str | dict, seed: int, seq_len: int | None = None) -> nn.Module:
    """``AutoModelForCausalLM.from_config`` in fp32, seeded: every rank draws the same weights."""
    from transformers import AutoModelForCausalLM

    config = hf_config_from(spec, seq_len)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


class HFCausalLM(nn.Module):
    """A parallelised transformers causal LM behind the trainer's interface: ``forward(idx_BS)`` returns
    ``LMOutput`` (logits from the HF model, the sum of our layers' aux losses, their MoEOutputs in order)."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model

    def forward(self, idx_BS: Tensor):
        from moe_dist.models.transformer import LMOutput

        blocks = hf_moe_blocks(self.hf)
        for b in blocks:
            b.last = None
        logits_BSV = self.hf(input_ids=idx_BS, use_cache=False).logits
        outs = [b.last for b in blocks if b.last is not None]
        aux = sum((o.aux_loss for o in outs), logits_BSV.new_zeros(()))
        return LMOutput(logits_BSV, aux, outs)

    def active_params(self) -> int:
        """Dense params (shared experts included) + K of N experts per MoE layer, for the MFU estimate."""
        from moe_dist.moe.sync import dense_params

        dense = sum(p.numel() for p in dense_params(self))
        routed = 0
        for layer in moe_layers(self):
            c = layer.cfg
            routed += c.top_k * (3 if c.gated else 2) * c.d_model * c.d_ff
        return dense + routed

    def flops_per_token(self, seq_len: int) -> float:
        """nanoGPT's estimate: 6 x active params + attention 12 * layers * hidden * seq."""
        c = self.hf.config
        return 6 * self.active_params() + 12 * c.num_hidden_layers * c.hidden_size * seq_len
