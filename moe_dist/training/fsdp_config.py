"""``engine: fsdp``'s config section (``fsdp:``) and what the engine refuses at config load, before any
process group: kept out of config.py (its size), read by ``RunConfig``."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from moe_dist.errors import ConfigError
from moe_dist.moe.config import check_type


@dataclass
class FSDPConfig:
    """``engine: fsdp`` (moe_dist/training/fsdp_engine.py): FSDP2 beside expert parallelism."""

    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward (all-gathered again in backward): less
    memory, one more all-gather per block per micro-batch. The root unit never reshards after forward."""

    def __post_init__(self) -> None:
        check_type("fsdp", "reshard_after_forward", self.reshard_after_forward, (bool,))


FSDP_API = ("set_gradient_divide_factor", "set_force_sum_reduction_for_comms", "set_requires_gradient_sync")
"""The ``FSDPModule`` methods ``engine: fsdp`` needs (torch 2.8 and later have them), besides
``fully_shard(ignored_params=...)``."""


def refuse_for_fsdp(cfg: Any) -> None:
    """What ``engine: fsdp`` does not support, as one ConfigError line (at config load, before any group).
    ``cfg`` is the ``RunConfig`` (not imported: config.py imports this module)."""
    import torch

    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:
        FSDPModule = fully_shard = None  # noqa: N806 - the names torch gives them
    missing = [m for m in FSDP_API if not hasattr(FSDPModule, m)]
    if fully_shard is not None and "ignored_params" not in inspect.signature(fully_shard).parameters:
        missing.append("fully_shard(ignored_params=)")
    if fully_shard is None or missing:
        raise ConfigError(
            f"engine=fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard with "
            f"{', '.join(missing or FSDP_API)}); torch {torch.__version__} lacks it: upgrade torch "
            "(2.8 or later), or use engine=torch"
        )
    p = cfg.parallel
    if p.redundant_experts or p.placement == "balanced":
        raise ConfigError(
            "engine=fsdp does not support replicated experts or parallel.placement=balanced (moving or "
            "summing expert slots would have to act on FSDP-sharded weights and AdamW state): use "
            "engine=torch, or parallel.redundant_experts=0 and parallel.placement=contiguous"
        )
    if cfg.deepspeed.zero_stage or cfg.deepspeed.extra:
        raise ConfigError(
            "deepspeed.zero_stage and deepspeed.extra apply to engine=deepspeed only (engine=fsdp shards "
            "parameters, gradients and AdamW state itself): remove them, or use engine=deepspeed"
        )
