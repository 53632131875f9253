"""The names inside ``checkpoints/``, spelled once: every writer and reader (the checkpoint manager, the
verifier, ``moe_dist.export_hf``, the launch preflight, the offline report) builds them from here."""

from __future__ import annotations

import re

DENSE = "dense.pt"
"""Rank 0's file: replicated params and buffers, their AdamW state, scheduler, step, controller, ..."""

MANIFEST = "manifest.json"
"""sha256 and size of every file, world, ep, step, expert ranges, placements, the resolved config."""

STEP_DIR = re.compile(r"step_\d{8}")
"""The only directory names that are checkpoints."""

STEP_GLOB = "step_*"
"""A glob that matches every checkpoint directory (and more: filter with ``STEP_DIR``)."""

# names of our own in checkpoints/ that are not checkpoints: half-written saves, set-aside corrupt ones,
# and the pointer file earlier versions wrote (no longer read nor written)
OWN = re.compile(r"step_\d{8}\.(tmp|corrupt(\.\d+)?)|latest")


def step_dir_name(step: int) -> str:
    """``step_00000100``: the directory of the checkpoint taken after ``step`` steps."""
    return f"step_{step:08d}"


def step_of(name: str) -> int:
    """The step of a checkpoint directory name (``step_00000100`` -> 100)."""
    return int(name.split("_")[1])


def experts_file(ep_rank: int) -> str:
    """The experts file of EP rank ``ep_rank`` (its first replica writes it)."""
    return f"experts_ep{ep_rank}.pt"


def rank_file(rank: int) -> str:
    """Rank ``rank``'s own file: RNG states (``engine: deepspeed``: its ZeRO partition too)."""
    return f"rank{rank}.pt"


def is_rank_file(name: str) -> bool:
    """Whether ``name`` is a rank file (the only files that may hold engine types)."""
    return name.startswith("rank")
