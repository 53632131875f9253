"""Load-aware placement: which experts get the redundant slots, and which EP rank holds each replica.

Shape legend: N logical experts, R EP ranks, L slots per rank, Q = R * L global slots; counts_RN[r][i] is the
number of rows EP rank r sent to logical expert i over the last window (load_N is its column sum).

    1. replicas (EPLB's rule): every expert starts with one replica; each of the Q - N redundant slots goes
       to the expert with the largest load_i / replicas_i (ties: lowest index), never past R replicas;
    2. packing: replicas by load_i / replicas_i, heaviest first (ties: lowest expert), each onto the rank
       with the smallest packed weight that has a free slot and does not hold that expert yet (ties:
       lowest rank);
    3. improving moves, scored with the exact replica rule (``Placement.route_table``): on the rank with the
       largest load, swap one of its slots with a slot of another rank, or hand a replicated expert's slot
       to an expert the rank lacks; the move that lowers the loads sorted largest first the most is taken,
       until none does (at most 64 moves);
    4. the result of steps 1-3, and of step 3 started from ``Placement.contiguous`` and from the previous
       placement (when given), are scored with ``Placement.rank_loads``: the smallest predicted max rank load
       wins; ties go to fewer slots changed from the previous placement, then to steps 1-3.

why the exact rule and not load_i / replicas_i (EPLB's model): a sender holding a replica keeps all its own
rows for it, and the other senders take the replicas in turn, so replicas do not split an expert's load
evenly (e.g. an expert whose rows all come from one rank gains nothing from a second replica).
why step 4: the improving moves only ever lower the sorted loads, so the result is never predicted worse
than the contiguous layout (or the previous one) on the same counts, and a rebalance that would gain nothing
keeps the previous table (no migration).

Everything is plain Python on the given numbers, with fixed tie-breaks: every rank that passes the same
(all-reduced) counts gets the same placement, with no collective.
"""

from __future__ import annotations

from moe_dist.errors import ConfigError
from moe_dist.moe.placement import Placement

Rows = list[list[int]]
"""rows[r]: the experts on EP rank r (a working copy of slot_expert_RL, slot order not yet fixed)."""


def expert_loads(counts_RN: list[list[float]]) -> list[float]:
    """load_N: rows per logical expert, summed over senders."""
    return [float(sum(col)) for col in zip(*counts_RN, strict=True)]


def replica_counts(load_N: list[float], ep: int, total_slots: int) -> list[int]:
    """Replicas per expert (step 1): each redundant slot to the largest load / replicas, at most ``ep``."""
    cnt = [1] * len(load_N)
    for _ in range(total_slots - len(load_N)):
        open_ = [i for i in range(len(load_N)) if cnt[i] < ep]
        best = max(open_, key=lambda i: (load_N[i] / cnt[i], -i))
        cnt[best] += 1
    return cnt


def greedy_pack(load_N: list[float], cnt_N: list[int], ep: int, slots: int) -> Rows:
    """Step 2: heaviest replica first onto the lightest rank with a free slot that lacks the expert."""
    w_N = [load / c for load, c in zip(load_N, cnt_N, strict=True)]
    items = sorted((e for e in range(len(cnt_N)) for _ in range(cnt_N[e])), key=lambda e: (-w_N[e], e))
    rows: Rows = [[] for _ in range(ep)]
    packed = [0.0] * ep
    for e in items:
        ok = [r for r in range(ep) if len(rows[r]) < slots and e not in rows[r]]
        if ok:
            r = min(ok, key=lambda r: (packed[r], r))
            rows[r].append(e)
            packed[r] += w_N[e]
            continue
        # every rank with a free slot already holds e: a full rank q lacking e gives one of its experts f
        # (one that the free rank r lacks; r holds fewer distinct experts than q, so there is one) to r
        r = next(r for r in range(ep) if len(rows[r]) < slots)
        q = next(q for q in range(ep) if e not in rows[q])
        f = next(f for f in rows[q] if f not in rows[r])
        rows[q][rows[q].index(f)] = e
        rows[r].append(f)
        packed[q] += w_N[e] - w_N[f]
        packed[r] += w_N[f]
    return rows


def expert_rank_loads(holders: list[int], col_R: list[float]) -> dict[int, float]:
    """Rows each holder of one expert computes under ``Placement.route_table``'s rule: its own senders' rows,
    plus those of the non-holders that take it in turn (``holders`` in rank order)."""
    out = {h: float(col_R[h]) for h in holders}
    held = set(holders)
    turn = 0
    for r, c in enumerate(col_R):
        if r not in held:
            out[holders[turn % len(holders)]] += c
            turn += 1
    return out


def _loads(rows: Rows, counts_RN: list[list[float]]) -> list[float]:
    loads = [0.0] * len(rows)
    for e, holders in _holders(rows, len(counts_RN[0])).items():
        for r, x in expert_rank_loads(holders, [row[e] for row in counts_RN]).items():
            loads[r] += x
    return loads


def _holders(rows: Rows, num_experts: int) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {e: [] for e in range(num_experts)}
    for r, row in enumerate(rows):
        for e in row:
            out[e].append(r)
    return out


def _better(a: list[float], b: list[float], tol: float) -> bool:
    """Whether loads ``a`` sorted largest first are lexicographically smaller than ``b``'s, beyond ``tol``."""
    for x, y in zip(sorted(a, reverse=True), sorted(b, reverse=True), strict=True):
        if x < y - tol:
            return True
        if x > y + tol:
            return False
    return False


def _moves(rows: Rows, holders: dict[int, list[int]], m: int, N: int):
    """Every move on rank m: (move, {expert: its holders after the move}) for the experts it changes."""
    for a, e in enumerate(rows[m]):
        he = [r for r in holders[e] if r != m]
        for q in range(len(rows)):
            if q == m or e in rows[q]:
                continue
            for b, f in enumerate(rows[q]):
                if f not in rows[m]:
                    hf = sorted([r for r in holders[f] if r != q] + [m])
                    yield ("swap", a, q, b), {e: sorted(he + [q]), f: hf}
        if he:  # e keeps a replica elsewhere: its slot on m may go to an expert m lacks
            for f in range(N):
                if f not in rows[m]:
                    yield ("give", a, f), {e: he, f: sorted(holders[f] + [m])}


def improve(rows: Rows, counts_RN: list[list[float]], max_rounds: int = 64) -> Rows:
    """Step 3: improving swaps and hand-overs on the most loaded rank, scored with the exact rule."""
    N, R = len(counts_RN[0]), len(rows)
    col_NR = [[row[e] for row in counts_RN] for e in range(N)]
    rows = [list(r) for r in rows]
    # why a tolerance: float sums that differ only by rounding must not pass for an improvement
    tol = 1e-9 * max(1.0, sum(map(sum, counts_RN)))
    memo: dict[tuple[int, tuple[int, ...]], dict[int, float]] = {}

    def contrib(e: int, hs: list[int]) -> dict[int, float]:
        # why a memo: a move's holder sets recur across the candidates (and rounds) of one search
        key = (e, tuple(hs))
        if key not in memo:
            memo[key] = expert_rank_loads(hs, col_NR[e])
        return memo[key]

    for _ in range(max_rounds):
        loads = _loads(rows, counts_RN)
        holders = _holders(rows, N)
        m = max(range(R), key=lambda r: (loads[r], -r))
        best_loads, best_move = loads, None
        for move, changes in _moves(rows, holders, m, N):
            new = list(loads)
            for e, hs in changes.items():
                for r, x in contrib(e, holders[e]).items():
                    new[r] -= x
                for r, x in contrib(e, hs).items():
                    new[r] += x
            if _better(new, best_loads, tol):
                best_loads, best_move = new, move
        if best_move is None:
            break
        if best_move[0] == "swap":
            _, a, q, b = best_move
            rows[m][a], rows[q][b] = rows[q][b], rows[m][a]
        else:
            _, a, f = best_move
            rows[m][a] = f
    return rows


def align_slots(rows: Rows, prev: Placement | None) -> tuple[tuple[int, ...], ...]:
    """Slot order within each rank: an expert that ``prev`` already had on this rank keeps its slot (so an
    unchanged rank is an unchanged row); the others fill the free slots in ascending expert order."""
    out = []
    for r, row in enumerate(rows):
        slots: list[int | None] = [None] * len(row)
        rest = sorted(row)
        if prev is not None and prev.slots_per_rank == len(row):
            for s, e in enumerate(prev.slot_expert_RL[r]):
                if e in rest:
                    slots[s] = e
                    rest.remove(e)
        it = iter(rest)
        out.append(tuple(e if e is not None else next(it) for e in slots))
    return tuple(out)


def balanced_placement(
    counts_RN: list[list[float]],
    ep: int,
    slots_per_rank: int,
    version: int = 0,
    prev: Placement | None = None,
) -> Placement:
    """The placement with the smallest predicted max rank load that steps 1-4 (module doc) find.

    ``counts_RN`` is [ep][N]. ``prev`` (optional, the placement in use) is one more start of the search and
    breaks ties (fewer changed slots win), and fixes the slot order within ranks so that experts that stay
    on a rank stay in their slot (``keep_if_unchanged`` then tells an unchanged table). All-zero counts give
    ``Placement.contiguous``.
    """
    if len(counts_RN) != ep or not counts_RN or not counts_RN[0]:
        raise ConfigError(f"balanced_placement: counts_RN must be [ep={ep}][N], got {len(counts_RN)} rows")
    N = len(counts_RN[0])
    if N % ep:
        raise ConfigError(f"balanced_placement: {N} experts are not divisible by the EP size {ep}")
    if not N // ep <= slots_per_rank <= N:
        raise ConfigError(
            f"balanced_placement: {slots_per_rank} slots per rank; needs N/ep={N // ep} to N={N} (a rank "
            f"never holds an expert twice)"
        )
    redundant = slots_per_rank - N // ep
    load_N = expert_loads(counts_RN)
    if not any(load_N):
        rows = Placement.contiguous(N, ep, redundant).slot_expert_RL
        return Placement(N, rows if prev is None else align_slots([list(r) for r in rows], prev), version)
    starts = [greedy_pack(load_N, replica_counts(load_N, ep, ep * slots_per_rank), ep, slots_per_rank)]
    if redundant == 0 or (ep >= 2 and redundant <= N - N // ep):
        starts.append([list(r) for r in Placement.contiguous(N, ep, redundant).slot_expert_RL])
    same_shape = prev is not None and prev.shape == (N, ep, slots_per_rank)
    if same_shape:
        starts.append([list(r) for r in prev.slot_expert_RL])
    tol = 1e-9 * max(1.0, sum(load_N))  # why: equal peaks up to rounding count as a tie
    best: tuple[float, int, Placement] | None = None
    for rows in starts:
        cand = Placement(N, align_slots(improve(rows, counts_RN), prev), version)
        peak = max(cand.rank_loads(counts_RN))
        moved = len(moved_slots(prev, cand)) if same_shape else 0
        if best is None or peak < best[0] - tol or (peak <= best[0] + tol and moved < best[1]):
            best = (peak, moved, cand)
    return best[2]


def moved_slots(old: Placement, new: Placement) -> list[int]:
    """Global slot ids (r * L + s) whose logical expert differs between ``old`` and ``new``."""
    if (old.ep, old.slots_per_rank) != (new.ep, new.slots_per_rank):
        raise ConfigError(
            f"placements of different shapes: {old.ep}x{old.slots_per_rank} and {new.ep}x{new.slots_per_rank}"
        )
    L = old.slots_per_rank
    return [
        r * L + s
        for r, (a, b) in enumerate(zip(old.slot_expert_RL, new.slot_expert_RL, strict=True))
        for s in range(L)
        if a[s] != b[s]
    ]


def keep_if_unchanged(old: Placement, new: Placement) -> Placement:
    """``old`` itself (with its version) when ``new`` has the same table, so that nothing migrates and the
    profiler sees no new version; else ``new`` as it is."""
    if old.num_experts == new.num_experts and old.slot_expert_RL == new.slot_expert_RL:
        return old
    return new
