"""Tests spawn gloo ranks with the package's spawner (free port, join timeouts, groups destroyed)."""

from moe_dist.runtime.spawn import free_port, run_ranks

__all__ = ["free_port", "run_ranks"]
