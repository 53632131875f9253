"""The training-time rebalance loop (``parallel.placement: balanced``): every ``rebalance_every`` optimizer
steps, re-place every MoE layer's experts from the counts measured since the last rebalance, and move the
slots (weights and AdamW state, bit for bit) to their new ranks.

Shape legend: M MoE layers, R EP ranks, N logical experts, L slots per rank.

    1. window: each layer counts, on the device, the kept pairs its rank sent to each logical expert
       (``MoELayer.sent_counts_N``); at a rebalance ONE all-reduce over the world turns every rank's counts
       into the [M, R, N] block, row r summed over the ranks at EP position r of every EP group;
    2. placement: per layer, ``balanced_placement(counts_RN, R, L, version, prev=old)`` and
       ``keep_if_unchanged`` (no migration when nothing would change);
    3. migration: ``migrate_layers`` over this rank's EP group (one byte all-to-all for every layer).

why one placement for all EP groups (counts summed over DP) rather than one per EP group: the expert-data-
parallel gradient all-reduce sums slot s of every EP group, so all EP groups must hold the same expert in
each slot; one global table keeps that true by construction, with no extra agreement step.
why the window's own all-reduce (not the [R, N] block folded into the balancing all-reduce): a running sum
on the device costs no host sync per micro-batch, works whether or not the folded path is on, and one small
all-reduce every ``rebalance_every`` steps is noise.
why the window is checkpointed (not restarted at a resume): the placement at the next rebalance depends on
every step of the window, so a resume is bit-exact only if it sees the same counts; the counts are integers
in fp64, so the restored block added into the next all-reduce gives the same bits as never stopping.

Every rank derives the same placements from the same all-reduced numbers with no further collective.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moe_dist.moe.layer import MoELayer
from moe_dist.moe.parallel import ParallelLayout
from moe_dist.moe.placement import load_ratio
from moe_dist.placement.migrate import migrate_layers
from moe_dist.placement.rebalance import balanced_placement, keep_if_unchanged

log = logging.getLogger("moe_dist.placement.rebalance")


@dataclass
class Rebalanced:
    """What one rebalance did (the trainer writes it to straggler.jsonl and routing.jsonl)."""

    version: int
    """The run's placement version after it."""
    migration_ms: float
    migration_bytes: int
    tokens_per_expert_RN: list
    """The window's mean per-sender counts, per layer [R][N]."""
    window_steps: int


class RebalanceLoop:
    """Owns the rebalance window of the model's MoE layers. All methods that say "collective" must be called
    on every rank of the world together."""

    def __init__(self, layers: Sequence[MoELayer], layout: ParallelLayout, every: int) -> None:
        self.layers, self.layout, self.every = list(layers), layout, every
        self.since = 0
        """Optimizer step at which the window opened (the last rebalance, or 0)."""
        self.carry: Tensor | None = None
        """[M, R, N] window counts restored from a checkpoint (rank 0 only: the all-reduce adds them once)."""

    @property
    def version(self) -> int:
        """The run's placement version: the number of rebalances that changed some layer's table."""
        return max((m.placement.version for m in self.layers), default=0)

    def due(self, step: int, last: int | None = None) -> bool:
        """After step ``step`` (0-based, the number the profiler, the JSONL files and TensorBoard give it:
        the ``every``-th, 2·``every``-th, ... step)? Never after ``last`` (the run's final step): a placement
        that no step would train with is not worth a migration before the last checkpoint."""
        return (step + 1) % self.every == 0 and step != last

    def window(self) -> Tensor:
        """Collective: fp64 [M, R, N] kept pairs sent to each logical expert since ``since``, by sender EP
        rank (summed over the EP groups). The layers' own counters are left as they are."""
        if not self.layers:
            return torch.zeros(0, 1, 1, dtype=torch.float64)
        first = self.layers[0]
        R, N = first.ep_size, first.placement.num_experts
        block = torch.zeros(len(self.layers), R, N, dtype=torch.float64, device=first.sent_counts_N.device)
        block[:, first.ep_rank] = torch.stack([m.sent_counts_N for m in self.layers])
        if self.carry is not None:
            block += self.carry.to(block.device)
        if self.layout.world > 1:
            dist.all_reduce(block, group=self.layout.world_group)
        return block.cpu()

    def reset(self, step: int) -> None:
        for m in self.layers:
            m.sent_counts_N.zero_()
        self.carry, self.since = None, step

    def rebalance(self, step: int, optimizer: torch.optim.Optimizer | None) -> Rebalanced:
        """Collective: re-place and migrate every layer after step ``step`` (0-based, as ``due``; after
        zero_grad with set_to_none). Returns the profiler's fields and the window's per-step mean counts per
        layer."""
        done = step + 1  # why a count: ``since`` (checkpointed, and a resume's reset) counts steps taken
        counts_MRN = self.window()
        version = self.version + 1  # why one number: every layer that changes now gets the same version
        new, before, after = [], [], []
        for m, c_RN in zip(self.layers, counts_MRN.tolist(), strict=True):
            old = m.placement
            p = keep_if_unchanged(old, balanced_placement(c_RN, old.ep, old.slots_per_rank, version, old))
            new.append(p)
            before.append(load_ratio(old.rank_loads(c_RN)))
            after.append(load_ratio(p.rank_loads(c_RN)))
        stats = migrate_layers(self.layers, new, optimizer, self.layout.ep_group)
        steps = max(1, done - self.since)
        self.reset(done)
        if self.layout.rank == 0:
            log.info(
                "step %d: rebalance to placement v%d: predicted max/mean rank load %s; %d slots moved, "
                "%.1f ms, %d bytes over the EP group",
                step,
                self.version,
                ", ".join(
                    f"L{i} {b:.3f}->{a:.3f}" for i, (b, a) in enumerate(zip(before, after, strict=True))
                ),
                stats.slots_changed,
                stats.seconds * 1e3,
                stats.bytes_total,
            )
        return Rebalanced(
            version=self.version,
            migration_ms=stats.seconds * 1e3,
            migration_bytes=stats.bytes_total,
            tokens_per_expert_RN=(counts_MRN / steps).tolist(),
            window_steps=steps,
        )

    def state_dict(self) -> dict:
        """Collective: the window so far (what a resume needs to rebalance exactly as an unbroken run)."""
        # why the key keeps its old letters: it is the checkpoint format
        return {"counts_LRN": self.window(), "since": self.since}

    def load_state_dict(self, state: dict) -> bool:
        """Restore a window stored by ``state_dict``; False (the window then restarts) when its shape does not
        fit this model's layers and EP size."""
        counts = state.get("counts_LRN")
        first = self.layers[0] if self.layers else None
        want = (len(self.layers), first.ep_size, first.placement.num_experts) if first else None
        if not torch.is_tensor(counts) or tuple(counts.shape) != want:
            return False
        for m in self.layers:
            m.sent_counts_N.zero_()
        self.carry = counts.to(torch.float64) if self.layout.rank == 0 else None
        self.since = int(state["since"])
        return True
