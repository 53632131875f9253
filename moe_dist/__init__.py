"""moe_dist: distributed Mixture-of-Experts with expert parallelism and a straggler profiler.

The names below load on first use (PEP 562): ``python -m moe_dist.train`` can then decide whether to
re-execute itself under mimalloc before it imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ConfigError": "moe_dist.errors",
    "NonFiniteError": "moe_dist.errors",
    "MoEConfig": "moe_dist.config",
    "MoEStats": "moe_dist.balance",
    "cv_squared": "moe_dist.balance",
    "MoELayer": "moe_dist.layer",
    "MoEOutput": "moe_dist.layer",
    "moe_layers": "moe_dist.layer",
    "update_expert_biases": "moe_dist.layer",
    "ParallelLayout": "moe_dist.parallel",
    "Placement": "moe_dist.placement",
    "broadcast_parameters": "moe_dist.sync",
    "dense_params": "moe_dist.sync",
    "expert_params": "moe_dist.sync",
    "sync_gradients": "moe_dist.sync",
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
    from moe_dist.balance import MoEStats, cv_squared
    from moe_dist.config import MoEConfig
    from moe_dist.errors import ConfigError, NonFiniteError
    from moe_dist.layer import MoELayer, MoEOutput, moe_layers, update_expert_biases
    from moe_dist.parallel import ParallelLayout
    from moe_dist.placement import Placement
    from moe_dist.sync import broadcast_parameters, dense_params, expert_params, sync_gradients


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moe_dist' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
