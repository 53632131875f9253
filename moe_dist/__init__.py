"""moe_dist: distributed Mixture-of-Experts with expert parallelism and a straggler profiler."""

from moe_dist.balance import MoEStats, cv_squared
from moe_dist.config import MoEConfig
from moe_dist.errors import ConfigError, NonFiniteError
from moe_dist.layer import MoELayer, MoEOutput, moe_layers, update_expert_biases

__all__ = [
    "ConfigError",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "MoEStats",
    "NonFiniteError",
    "cv_squared",
    "moe_layers",
    "update_expert_biases",
]
