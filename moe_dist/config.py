"""The MoE layer's config: one small dataclass, validated in ``__post_init__`` (before any collective)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from moe_dist.errors import ConfigError

SCORE_FUNCS = ("softmax", "sigmoid", "exp")
BALANCE_SCOPES = ("global", "local", "global_batch")
ACTIVATIONS = ("gelu", "silu", "relu")


def check_type(owner: str, name: str, value: object, kinds: tuple[type, ...], optional: bool = False) -> None:
    """Raise ConfigError unless ``value`` is one of ``kinds`` (bool is never accepted as a number)."""
    if value is None and optional:
        return
    is_bool = isinstance(value, bool)
    ok = isinstance(value, kinds) and (not is_bool or bool in kinds)
    if not ok:
        want = " or ".join(k.__name__ for k in kinds) + (" or null" if optional else "")
        raise ConfigError(f"{owner}.{name} must be {want}, got {value!r} ({type(value).__name__})")


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
    bias_update_rate: float = 0.0
    """gamma of auxiliary-loss-free balancing (DeepSeek-V3): b_i += gamma * sign(mean n - n_i) per step."""
    capacity_factor: float | None = None
    """None = dropless. A float: each rank keeps at most ceil(cf * K * T_local / N) tokens per expert."""
    residual: bool = True
    """Add the input back: h = u + sum g FFN(u), as in the seed."""
    activation: str = "gelu"
    """Expert FFN nonlinearity."""
    noisy_gating: bool = False
    """Shazeer et al. 2017 noisy top-K in training: logits + eps * softplus(u . w_noise); enables the
    smooth load estimator so that the CV^2(load) penalty trains the router."""
    router_init_std: float = 0.02
    """Std of the normal init of the expert centroids e_i."""
    check_finite: bool = True
    """Raise NonFiniteError (naming the layer) on NaN/Inf router logits; every rank raises together."""

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
            ("activation", ACTIVATIONS),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(f"{owner}.{name} must be one of {choices}, got {value!r}")
        for name in (
            *(() if self.aux_loss_coef == "auto" else ("aux_loss_coef",)),
            "auto_aux_init",
            "z_loss_coef",
            "cv_importance_coef",
            "cv_load_coef",
            "bias_update_rate",
            "router_init_std",
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
        for name in ("normalize_topk", "residual", "noisy_gating", "check_finite"):
            check_type(owner, name, getattr(self, name), (bool,))
        if self.noisy_gating and self.bias_update_rate > 0:
            # why: the smooth load estimator models noise on logits and has no term for the selection bias
            raise ConfigError("moe.noisy_gating and moe.bias_update_rate > 0 cannot be combined; pick one")

    @property
    def initial_alpha(self) -> float:
        return float(self.auto_aux_init if self.aux_loss_coef == "auto" else self.aux_loss_coef)
