"""The parallel layout: world = dp x ep, decided and validated once; it owns every process group.

Rank r sits at (dp index r // ep, ep index r % ep), the same layout as DeepSpeed's default
(``deepspeed.utils.groups``): EP groups are contiguous blocks [0..ep), [ep..2ep), ...; expert-data-
parallel groups are strided {e, e+ep, e+2ep, ...}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from moe_dist.errors import ConfigError
from moe_dist.moe.comm import GroupRef


def _weak_group(name: str) -> property:
    """A layout attribute that stores its process group as a ``GroupRef`` in ``_groups``."""

    def get(self: ParallelLayout):
        ref = self._groups.get(name)
        return ref.get() if ref is not None else None

    def put(self: ParallelLayout, group) -> None:
        self._groups[name] = GroupRef(group)

    return property(get, put)


@dataclass
class ParallelLayout:
    world: int
    rank: int
    ep: int
    _groups: dict[str, GroupRef] = field(default_factory=dict, repr=False)
    """The groups below, held by weak reference (``moe_dist.moe.comm.GroupRef``: a destroyed process group
    must
    really go, with its gloo threads; torch's registry holds every live group)."""

    ep_group = _weak_group("ep_group")
    """why: the ranks the experts are split across; tokens travel between them by all-to-all."""
    edp_group = _weak_group("edp_group")
    """why: ranks holding the same experts (one per EP group); expert grads are summed over it."""
    world_group = _weak_group("world_group")
    """why: dense params are replicated everywhere, so their grads are averaged over the world."""
    balance_group = _weak_group("balance_group")
    """why: every rank sees different tokens, so f_i and P_i pool the whole world."""

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ConfigError(f"rank {self.rank} is outside a world of {self.world}")
        if self.ep < 1 or self.world % self.ep:
            raise ConfigError(f"parallel.ep={self.ep} does not divide the world size {self.world}")

    @property
    def dp(self) -> int:
        return self.world // self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    def ep_ranks(self, dp_index: int) -> list[int]:
        return [dp_index * self.ep + e for e in range(self.ep)]

    def edp_ranks(self, ep_index: int) -> list[int]:
        return [d * self.ep + ep_index for d in range(self.dp)]

    @classmethod
    def build(cls, ep: int) -> ParallelLayout:
        """Create every group (all ranks must call this, in the same order) from the default group."""
        layout = cls(world=dist.get_world_size(), rank=dist.get_rank(), ep=ep)
        layout.world_group = dist.group.WORLD
        layout.balance_group = dist.group.WORLD if layout.world > 1 else None
        # new_group is collective over the world: every rank creates every group, keeps its own
        for d in range(layout.dp):
            g = dist.new_group(layout.ep_ranks(d))
            if d == layout.dp_rank:
                layout.ep_group = g if ep > 1 else None
        for e in range(ep):
            g = dist.new_group(layout.edp_ranks(e))
            if e == layout.ep_rank:
                layout.edp_group = g if layout.dp > 1 else None
        return layout
