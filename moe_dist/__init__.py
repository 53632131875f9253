"""moe_dist: distributed Mixture-of-Experts with expert parallelism and a straggler profiler."""

from moe_dist.balance import MoEStats, cv_squared
from moe_dist.config import MoEConfig
from moe_dist.errors import ConfigError, NonFiniteError
from moe_dist.layer import MoELayer, MoEOutput, moe_layers, update_expert_biases
from moe_dist.parallel import ParallelLayout
from moe_dist.placement import Placement
from moe_dist.sync import broadcast_parameters, dense_params, expert_params, sync_gradients

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
