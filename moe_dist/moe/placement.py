"""Where each logical expert lives: a placement table of EP ranks x slots, with optional replicas.

Shape legend: N logical experts, R EP ranks, L slots per rank (N / R + redundant), Q = R * L global slots.

A slot is one stacked expert of a rank (``MoELayer.experts`` holds L of them). Global slot id = r * L + s.
Every logical expert sits in at least one slot; an expert in several slots is *replicated*, and its replicas
hold identical weights (their gradients are summed before every optimizer step). Balancing terms (f_i, P_i,
the bias) stay per logical expert; only the dispatcher sees slots.

Replica choice (``route_table``): a sender uses the replica on its own rank if there is one; otherwise the
senders that hold no replica take the replicas in turn, by their EP rank.
why this rule: the choice depends on (sender, expert) only, so dispatch is one table lookup per pair, a
sender's pairs for an expert all go to one slot (its per-expert capacity and drop decisions are those of the
logical expert, exactly as without replicas), and each receiver sizes its buffers from the already all-reduced
[R, N] count block with no extra collective. Preferring the local replica keeps those rows off the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from moe_dist.errors import ConfigError

DEEPSPEED_REFUSES_REPLICAS = (
    "engine=deepspeed does not support replicated experts (parallel.redundant_experts > 0, or a placement "
    "with an expert in several slots): DeepSpeed's expert-gradient reduction does not sum replicas, so "
    "they would drift apart; use engine=torch or parallel.redundant_experts=0"
)

DEEPSPEED_REFUSES_BALANCED = (
    "engine=deepspeed does not support parallel.placement=balanced: moving experts between ranks mid-run "
    "would have to move DeepSpeed's partitioned optimizer state too; use engine=torch or "
    "parallel.placement=contiguous"
)


def load_ratio(loads: Sequence[float], empty: float = 0.0) -> float:
    """max / mean of per-rank loads (1.0 = perfectly even); ``empty`` when nothing was counted."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else empty


def check_redundant(num_experts: int, ep: int, redundant: int) -> None:
    """Raise ConfigError unless ``redundant`` extra slots per rank fit N experts over ``ep`` ranks: 0, or
    EP >= 2 and at most N - N/EP (a rank cannot hold an expert twice)."""
    L = num_experts // ep
    if not isinstance(redundant, int) or isinstance(redundant, bool):
        raise ConfigError(f"parallel.redundant_experts must be an int, got {redundant!r}")
    if redundant < 0 or (redundant > 0 and (ep < 2 or redundant > num_experts - L)):
        raise ConfigError(
            f"parallel.redundant_experts={redundant}: needs 0, or EP >= 2 and at most "
            f"{num_experts - L} (the experts a rank does not already hold; N={num_experts}, EP={ep})"
        )


@dataclass(frozen=True)
class Placement:
    num_experts: int
    slot_expert_RL: tuple[tuple[int, ...], ...]
    """slot_expert_RL[r][s]: the logical expert in slot s of EP rank r."""
    version: int = 0
    """Bumped on every change (the profiler records it per step)."""
    _replicas: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # why normalise: lists (from JSON or a caller) would make the frozen table unhashable and mutable
        try:
            rows = tuple(tuple(int(e) for e in row) for row in self.slot_expert_RL)
        except (TypeError, ValueError):
            raise ConfigError(f"a placement is rows of expert ids, got {self.slot_expert_RL!r}") from None
        object.__setattr__(self, "slot_expert_RL", rows)
        if not rows or any(len(row) != len(rows[0]) for row in rows) or not rows[0]:
            raise ConfigError(f"a placement needs the same number (>= 1) of slots on every rank, got {rows}")
        seen: dict[int, list[tuple[int, int]]] = {}
        for r, row in enumerate(rows):
            if len(set(row)) != len(row):
                raise ConfigError(f"placement: EP rank {r} holds an expert twice: {list(row)}")
            for s, e in enumerate(row):
                if not 0 <= e < self.num_experts:
                    raise ConfigError(
                        f"placement: slot ({r}, {s}) holds expert {e}, outside [0, {self.num_experts})"
                    )
                seen.setdefault(e, []).append((r, s))
        missing = sorted(set(range(self.num_experts)) - set(seen))
        if missing:
            raise ConfigError(f"placement: experts {missing} have no slot")
        object.__setattr__(self, "_replicas", {e: tuple(v) for e, v in seen.items()})

    @property
    def ep(self) -> int:
        return len(self.slot_expert_RL)

    @property
    def slots_per_rank(self) -> int:
        return len(self.slot_expert_RL[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(experts, EP ranks, slots per rank): what stacked slot tensors are sized by. Placements of one
        shape can replace each other (migration, set_placement, a resume) without resizing anything."""
        return self.num_experts, self.ep, self.slots_per_rank

    @property
    def redundant(self) -> int:
        """Slots per rank beyond N / R."""
        return self.slots_per_rank - self.num_experts // self.ep

    @classmethod
    def contiguous(cls, num_experts: int, ep: int, redundant: int = 0) -> Placement:
        """Today's layout: rank r holds experts [r*L, (r+1)*L), L = N / R. Redundant slots (if any) start as
        replicas of the next rank's experts, until a balanced placement replaces them."""
        if num_experts % ep:
            raise ConfigError(f"moe.num_experts={num_experts} is not divisible by the EP size {ep}")
        check_redundant(num_experts, ep, redundant)
        L = num_experts // ep
        rows = []
        for r in range(ep):
            own = list(range(r * L, (r + 1) * L))
            extra = [((r + 1) * L + j) % num_experts for j in range(redundant)]
            rows.append(tuple(own + extra))
        return cls(num_experts, tuple(rows))

    def replicas(self, expert: int) -> tuple[tuple[int, int], ...]:
        """(rank, slot) of every replica of ``expert``, in rank order."""
        return self._replicas[expert]

    def is_replicated(self) -> bool:
        return any(len(v) > 1 for v in self._replicas.values())

    def replicated_experts(self) -> list[int]:
        """Logical experts held by more than one slot, in id order."""
        return [e for e in range(self.num_experts) if len(self._replicas[e]) > 1]

    def owner(self, expert: int) -> tuple[int, int]:
        """(rank, slot) of the first replica of ``expert`` in rank order: the copy a checkpoint writes and
        the grad norm counts."""
        return self._replicas[expert][0]

    def owned_slots(self, rank: int) -> list[int]:
        """Slots of ``rank`` that hold the first replica of their expert."""
        return [s for s, e in enumerate(self.slot_expert_RL[rank]) if self.owner(e) == (rank, s)]

    def route_table(self, src_rank: int) -> list[int]:
        """Global slot id (r * L + s) that sender ``src_rank`` uses for each logical expert (module doc)."""
        L, table = self.slots_per_rank, []
        for e in range(self.num_experts):
            reps = self._replicas[e]
            local = [s for r, s in reps if r == src_rank]
            if local:
                table.append(src_rank * L + local[0])
                continue
            holders = {r for r, _ in reps}
            turn = [r for r in range(self.ep) if r not in holders].index(src_rank)
            r, s = reps[turn % len(reps)]
            table.append(r * L + s)
        return table

    def slot_loads(self, counts_RN: list[list[float]]) -> list[float]:
        """Rows each global slot receives when sender r sends counts_RN[r][i] pairs to expert i."""
        if len(counts_RN) != self.ep or any(len(row) != self.num_experts for row in counts_RN):
            raise ValueError(
                f"slot_loads needs an [{self.ep}, {self.num_experts}] count matrix (EP ranks x experts)"
            )
        loads = [0.0] * (self.ep * self.slots_per_rank)
        for r, row in enumerate(counts_RN):
            for e, q in enumerate(self.route_table(r)):
                loads[q] += row[e]
        return loads

    def rank_loads(self, counts_RN: list[list[float]]) -> list[float]:
        """Rows each EP rank's experts compute (the sum of its slots' loads)."""
        L, loads = self.slots_per_rank, self.slot_loads(counts_RN)
        return [sum(loads[r * L : (r + 1) * L]) for r in range(self.ep)]

    def to_dict(self) -> dict:
        return {
            "num_experts": self.num_experts,
            "slots": [list(r) for r in self.slot_expert_RL],
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Placement:
        return cls(
            int(d["num_experts"]),
            tuple(tuple(int(e) for e in r) for r in d["slots"]),
            int(d.get("version", 0)),
        )
