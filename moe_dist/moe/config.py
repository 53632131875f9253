"""The MoE layer's config: one small dataclass, validated in ``__post_init__`` (before any collective)."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

from moe_dist.errors import ConfigError

SCORE_FUNCS = ("softmax", "sigmoid", "exp")
BALANCE_SCOPES = ("global", "local", "global_batch")
AUX_LOSS_COUNTS = ("routed", "unbiased")
DISPATCHES = ("pairs", "dedup")
ACTIVATIONS = ("gelu", "silu", "relu", "swiglu", "geglu")
GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu"}
"""Gated activations and the nonlinearity on their gate half: FFN(u) = (act(u W_gate) * u W_up) W_down."""


def check_type(owner: str, name: str, value: object, kinds: tuple[type, ...], optional: bool = False) -> None:
    """Raise ConfigError unless ``value`` is one of ``kinds`` (bool is never accepted as a number)."""
    if value is None and optional:
        return
    is_bool = isinstance(value, bool)
    ok = isinstance(value, kinds) and (not is_bool or bool in kinds)
    if not ok:
        want = " or ".join(k.__name__ for k in kinds) + (" or null" if optional else "")
        raise ConfigError(f"{owner}.{name} must be {want}, got {value!r} ({type(value).__name__})")


def check_positive(owner: str, obj: Any, *names: str, allow_zero: bool = False) -> None:
    """Raise ConfigError unless each named field is a finite number > 0 (>= 0 with ``allow_zero``)."""
    for name in names:
        value = getattr(obj, name)
        check_type(owner, name, value, (int, float))
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"{owner}.{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass
class MoEConfig:
    """One MoE layer: h = u + sum_i g_i FFN_i(u), with s_i = G(u . e_i) (the seed's definitions)."""

    d_model: int = 256
    """D: model (token) dimension."""
    d_ff: int = 1024
    """F: hidden width of each expert FFN (D -> F -> D)."""
    num_experts: int = 8
    """N: number of experts in the layer (split contiguously over the EP group)."""
    top_k: int = 2
    """K: experts chosen per token."""
    score_func: str = "softmax"
    """The seed's G: "softmax" over experts, elementwise "sigmoid", or elementwise "exp"."""
    normalize_topk: bool = False
    """Renormalise the K gates of a token to sum to 1 (Mixtral); off in the seed."""
    aux_loss_coef: float | str = 1e-2
    """alpha in the Switch loss alpha * sum_i f_i P_i, or "auto": the trainer's balance controller sets it
    (``auto_aux`` in the run config) and the layer starts from ``auto_aux_init``."""
    auto_aux_init: float = 1e-2
    """Starting alpha when aux_loss_coef is "auto"."""
    z_loss_coef: float = 0.0
    """Router z-loss weight: coef * mean_t (logsumexp_i logits_ti)^2 (ST-MoE)."""
    cv_importance_coef: float = 0.0
    """lambda_P in lambda_P * CV^2({P_i}) (population variance, as in the seed)."""
    cv_load_coef: float = 0.0
    """lambda_f in lambda_f * CV^2({f_i}); carries gradient only with ``noisy_gating`` (smooth load)."""
    balance_scope: str = "global"
    """Tokens pooled for f_i and P_i: "global" (balance group, this micro-batch), "local" (this rank), or
    "global_batch" (balance group, every micro-batch of the optimizer step so far: running f)."""
    aux_loss_counts: str = "routed"
    """Which top-K the Switch loss's f_i counts when a selection bias (bias_update_rate > 0) or a group limit
    steers routing; without either the two are the same. "routed": the routing choice, bias and group limit
    included, i.e. the load the dispatcher sees. "unbiased": top-K of the unbiased scores s over all experts
    (Megatron-Core's ``compute_routing_scores_for_aux_loss``). Default "routed", because the loss exists to
    balance the load the experts actually get and the seed's f_i counts the routing choice; pick "unbiased"
    to reproduce a Megatron run (the HF adapter does for DeepSeek-V3). CV^2(f), the bias update and the
    logged f always use the routed counts; the sequence-wise loss always counts unbiased (eq. 18)."""
    bias_update_rate: float = 0.0
    """gamma of auxiliary-loss-free balancing (DeepSeek-V3): b_i += gamma * sign(mean n - n_i) per step."""
    capacity_factor: float | None = None
    """None = dropless. A float: each rank keeps at most ceil(cf * K * T_local / N) tokens per expert."""
    residual: bool = True
    """Add the input back: h = u + sum g FFN(u), as in the seed."""
    activation: str = "gelu"
    """Expert FFN nonlinearity: "gelu", "silu", "relu" (FFN(u) = act(u W1) W2), or the gated "swiglu" /
    "geglu" (FFN(u) = (act(u W_gate) * u W_up) W2, act = silu / gelu; W1 = [W_gate | W_up], F wide each).
    The shared experts use the same one."""
    num_shared_experts: int = 0
    """Shared experts every token passes through beside the routed ones (DeepSeek-V3, Qwen2-MoE). They are
    implemented as ONE dense FFN of width num_shared_experts * shared_d_ff (as DeepSeek-V3 and Qwen2-MoE
    do): replicated on every rank, world-averaged gradients, not expert-parallel."""
    shared_d_ff: int | None = None
    """Hidden width of each shared expert; None = d_ff."""
    shared_expert_gate: bool = False
    """Scale the shared output per token by sigmoid(u . w_g) (Qwen2-MoE's shared_expert_gate)."""
    routed_scaling_factor: float = 1.0
    """Gates are multiplied by this after the optional renormalisation (DeepSeek-V3; 2.5 there)."""
    n_group: int | None = None
    """Group-limited routing (DeepSeek-V3): experts split into n_group contiguous groups; None = off.
    n_group = EP size makes it device-limited routing (each token reaches at most topk_group ranks)."""
    topk_group: int | None = None
    """Groups kept per token (those with the largest sum of their two best biased scores); top-K is then
    taken inside them only. Set together with n_group."""
    seq_aux_loss_coef: float = 0.0
    """alpha of DeepSeek-V3's sequence-wise balance loss (eq. 17-20): alpha * mean over sequences of
    sum_i f_i P_i with f, P per sequence, f counting the top-K of the unbiased scores s (eq. 18: no selection
    bias, no group limit) and P over scores normalised to sum 1 per token. The input's second-to-last dim
    is the sequence ([B, S, D]; a [T, D] input is one sequence)."""
    noisy_gating: bool = False
    """Shazeer et al. 2017 noisy top-K in training: logits + eps * softplus(u . w_noise); enables the
    smooth load estimator so that the CV^2(load) penalty trains the router."""
    router_init_std: float = 0.02
    """Std of the normal init of the expert centroids e_i."""
    check_finite: bool = True
    """Raise NonFiniteError (naming the layer) on NaN/Inf router logits; every rank raises together."""
    dispatch: str = "pairs"
    """How tokens cross the EP group: "pairs" sends one row per kept (token, expert) pair (DeepSpeed's and
    Megatron's all-to-all dispatcher); "dedup" sends each token once per destination rank with its list of
    (local slot, gate) pairs, expands it there and reduces the gate-weighted expert outputs into one row
    before the combine (DeepEP-style). Same math; fewer bytes when a token's experts share a rank. One EP
    rank: no communication either way."""
    overlap_shared: bool = False
    """Start the dispatch all-to-all asynchronously (async_op=True) and compute the shared experts while it
    is in flight, then wait (Megatron's shared-expert overlap); in backward the reverse all-to-all overlaps
    the shared experts' backward the same way. Same math and order as off: bit-equal results. Needs
    num_shared_experts >= 1 (nothing else of the layer is independent of the received rows)."""

    def __post_init__(self) -> None:
        owner = "moe"
        for name in ("d_model", "d_ff", "num_experts", "top_k"):
            check_type(owner, name, getattr(self, name), (int,))
            if getattr(self, name) < 1:
                raise ConfigError(f"{owner}.{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"{owner}.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        for name, choices in (
            ("score_func", SCORE_FUNCS),
            ("balance_scope", BALANCE_SCOPES),
            ("aux_loss_counts", AUX_LOSS_COUNTS),
            ("activation", ACTIVATIONS),
            ("dispatch", DISPATCHES),
        ):
            value = getattr(self, name)
            if value not in choices:
                near = difflib.get_close_matches(str(value), choices, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ConfigError(f"{owner}.{name} must be one of {choices}, got {value!r}{hint}")
        for name in (
            *(() if self.aux_loss_coef == "auto" else ("aux_loss_coef",)),
            "auto_aux_init",
            "z_loss_coef",
            "cv_importance_coef",
            "cv_load_coef",
            "bias_update_rate",
            "router_init_std",
            "seq_aux_loss_coef",
        ):
            value = getattr(self, name)
            check_type(owner, name, value, (int, float))
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{owner}.{name} must be a finite number >= 0, got {value!r}")
        check_type(owner, "capacity_factor", self.capacity_factor, (int, float), optional=True)
        if self.capacity_factor is not None and not (
            math.isfinite(self.capacity_factor) and self.capacity_factor > 0
        ):
            raise ConfigError(f"{owner}.capacity_factor must be > 0 or null, got {self.capacity_factor!r}")
        check_type(owner, "routed_scaling_factor", self.routed_scaling_factor, (int, float))
        if not (math.isfinite(self.routed_scaling_factor) and self.routed_scaling_factor > 0):
            raise ConfigError(
                f"{owner}.routed_scaling_factor must be finite and > 0, got {self.routed_scaling_factor!r}"
            )
        for name in ("normalize_topk", "residual", "noisy_gating", "check_finite", "shared_expert_gate"):
            check_type(owner, name, getattr(self, name), (bool,))
        self._check_shared(owner)
        self._check_groups(owner)
        if self.noisy_gating and self.bias_update_rate > 0:
            # why: the smooth load estimator models noise on logits and has no term for the selection bias
            raise ConfigError("moe.noisy_gating and moe.bias_update_rate > 0 cannot be combined; pick one")

    def _check_shared(self, owner: str) -> None:
        check_type(owner, "num_shared_experts", self.num_shared_experts, (int,))
        if self.num_shared_experts < 0:
            raise ConfigError(f"{owner}.num_shared_experts must be >= 0, got {self.num_shared_experts}")
        check_type(owner, "shared_d_ff", self.shared_d_ff, (int,), optional=True)
        if self.shared_d_ff is not None and self.shared_d_ff < 1:
            raise ConfigError(f"{owner}.shared_d_ff must be >= 1 or null, got {self.shared_d_ff}")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ConfigError(f"{owner}.shared_expert_gate needs {owner}.num_shared_experts >= 1")
        check_type(owner, "overlap_shared", self.overlap_shared, (bool,))
        if self.overlap_shared and self.num_shared_experts == 0:
            raise ConfigError(
                f"{owner}.overlap_shared needs {owner}.num_shared_experts >= 1 (nothing to overlap)"
            )

    def _check_groups(self, owner: str) -> None:
        check_type(owner, "n_group", self.n_group, (int,), optional=True)
        check_type(owner, "topk_group", self.topk_group, (int,), optional=True)
        if (self.n_group is None) != (self.topk_group is None):
            raise ConfigError(f"{owner}.n_group and {owner}.topk_group must be set together (or both null)")
        if self.n_group is None or self.topk_group is None:
            return
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise ConfigError(
                f"{owner}.n_group={self.n_group} must be >= 1 and divide num_experts={self.num_experts}"
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"{owner}.topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        reachable = self.topk_group * (self.num_experts // self.n_group)
        if self.top_k > reachable:
            raise ConfigError(
                f"{owner}.top_k={self.top_k} exceeds the {reachable} experts in topk_group={self.topk_group} "
                f"groups of {self.num_experts // self.n_group}"
            )
        if self.noisy_gating:
            # why: the smooth load estimator assumes plain top-K over all experts
            raise ConfigError(f"{owner}.noisy_gating and group-limited routing (n_group) cannot be combined")

    @property
    def gated(self) -> bool:
        """Whether the experts are gated (SwiGLU/GeGLU): W1 is then [D, 2F] = [W_gate | W_up]."""
        return self.activation in GATED_ACTIVATIONS

    @property
    def shared_width(self) -> int:
        """Hidden width of the one dense FFN that holds every shared expert (0 = none)."""
        return self.num_shared_experts * (self.d_ff if self.shared_d_ff is None else self.shared_d_ff)

    @property
    def initial_alpha(self) -> float:
        return float(self.auto_aux_init if self.aux_loss_coef == "auto" else self.aux_loss_coef)
