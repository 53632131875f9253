"""Checkpoints that survive a change of cluster: layout-independent data and validation, per-expert init,
global (per-expert) checkpoints resumed at another (world, EP), the resume self-check, async save."""

from __future__ import annotations

import torch

from moe_dist.data import Corpus
from moe_dist.run_config import DataConfig


def test_global_batch_does_not_depend_on_the_world_size() -> None:
    """micro_batch x world fixed: the ranks' slices of each global micro-batch, concatenated, are the same
    sequences at world 1, 2 and 4 (and so with grad_accum > 1, micro-batch by micro-batch)."""
    cfg = DataConfig(kind="synthetic", max_bytes=50_000)

    def global_batch(world: int, micro: int) -> torch.Tensor:
        parts = []
        for rank in range(world):
            corpus = Corpus.build(cfg, 16, rank, world, 0)
            parts.append(corpus.batch("train", 8 // world, 16, 0, rank, 5, micro)[0])
        return torch.cat(parts)

    for micro in (0, 1):
        want = global_batch(1, micro)
        assert torch.equal(global_batch(2, micro), want) and torch.equal(global_batch(4, micro), want)
    corpus = Corpus.build(cfg, 16, 0, 1, 0)
    assert not torch.equal(
        corpus.batch("train", 8, 16, 0, 0, 5, 0)[0], corpus.batch("train", 8, 16, 0, 0, 6, 0)[0]
    )
