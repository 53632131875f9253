"""moe_dist: distributed Mixture-of-Experts with expert parallelism and a straggler profiler.

The names below load on first use (PEP 562): ``python -m moe_dist.train`` can then decide whether to
re-execute itself under mimalloc before it imports torch.

Tensor names carry their shape as a suffix (``x_TD``, ``counts_RN``) in the letters of the project's one
shape legend, docs/contributing.md ("Shape legend"); each file's header names the subset it uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ConfigError": "moe_dist.errors",
    "NonFiniteError": "moe_dist.errors",
    "MoEConfig": "moe_dist.moe.config",
    "MoEStats": "moe_dist.moe.balance",
    "cv_squared": "moe_dist.moe.balance",
    "MoELayer": "moe_dist.moe.layer",
    "MoEOutput": "moe_dist.moe.layer",
    "moe_layers": "moe_dist.moe.layer",
    "update_expert_biases": "moe_dist.moe.layer",
    "ParallelLayout": "moe_dist.moe.parallel",
    "Placement": "moe_dist.moe.placement",
    "broadcast_parameters": "moe_dist.moe.sync",
    "dense_params": "moe_dist.moe.sync",
    "expert_params": "moe_dist.moe.sync",
    "sync_gradients": "moe_dist.moe.sync",
}

__all__ = [
    "ConfigError",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "MoEStats",
    "NonFiniteError",
    "ParallelLayout",
    "Placement",
    "broadcast_parameters",
    "cv_squared",
    "dense_params",
    "expert_params",
    "moe_layers",
    "sync_gradients",
    "update_expert_biases",
]

if TYPE_CHECKING:
    from moe_dist.errors import ConfigError, NonFiniteError
    from moe_dist.moe.balance import MoEStats, cv_squared
    from moe_dist.moe.config import MoEConfig
    from moe_dist.moe.layer import MoELayer, MoEOutput, moe_layers, update_expert_biases
    from moe_dist.moe.parallel import ParallelLayout
    from moe_dist.moe.placement import Placement
    from moe_dist.moe.sync import broadcast_parameters, dense_params, expert_params, sync_gradients


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moe_dist' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
