"""Load-aware placement (moe_dist.placement.rebalance) and exact migration (moe_dist.placement.migrate)
against plain oracles.

Shape legend: N logical experts, R EP ranks, S slots per rank.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from moe_dist.errors import ConfigError
from moe_dist.moe.placement import Placement
from moe_dist.placement.rebalance import (
    _loads,
    balanced_placement,
    keep_if_unchanged,
    moved_slots,
    replica_counts,
)
from tests.helpers.launch import run_ranks
from tests.placement.rebalance_workers import (
    logical_table,
    migration_cases,
    random_placement,
    rebalance_worker,
)


def skewed_counts(rng: random.Random, R: int, N: int) -> list[list[float]]:
    """Heavy-tailed per-(sender, expert) counts, integers as the layer's are."""
    return [[float(int(rng.paretovariate(1.3) * rng.randint(1, 20))) for _ in range(N)] for _ in range(R)]


def all_placements(N: int, R: int, S: int):
    """Every table of R ranks x S distinct experts (slot order fixed) that places every expert."""
    for rows in itertools.product(itertools.combinations(range(N), S), repeat=R):
        if set().union(*rows) == set(range(N)):
            yield Placement(N, rows)


# --- balanced_placement ---------------------------------------------------------------------------------
TINY = [[6.0, 2.0, 1.0, 1.0], [6.0, 0.0, 1.0, 1.0]]


def test_tiny_case_reaches_the_hand_computed_optimum() -> None:
    """N=4, R=2, S=3 (2 redundant slots). Loads 12, 2, 2, 2 (total 18): no table beats 18 / 2 = 9. EPLB's
    counts (2 replicas for expert 0, then for expert 1) leave expert 1's rows, which all come from rank 0, on
    rank 0: 6 + 2 + 2 = 10 at best. With expert 2 (1 row from each sender) replicated instead, every rank
    computes 6 (own expert-0 rows) + 1 (own expert-2 rows) + 2 (a single expert) = 9."""
    assert replica_counts([12.0, 2.0, 2.0, 2.0], ep=2, total_slots=6) == [2, 2, 1, 1]
    p = balanced_placement(TINY, ep=2, slots_per_rank=3)
    assert max(p.rank_loads(TINY)) == 9.0
    best = min(max(q.rank_loads(TINY)) for q in all_placements(4, 2, 3))
    assert best == 9.0
    eplb = [q for q in all_placements(4, 2, 3) if [len(q.replicas(e)) for e in range(4)] == [2, 2, 1, 1]]
    assert min(max(q.rank_loads(TINY)) for q in eplb) == 10.0


def test_hot_expert_gets_the_redundant_slots_first() -> None:
    """Expert 5 takes 25 rows from each of 4 senders, the others 1: it gets a replica on every rank (the
    cap), and the one redundant slot left goes to expert 0 (all others tie at load 4; lowest index)."""
    counts = [[25.0 if e == 5 else 1.0 for e in range(8)] for _ in range(4)]
    assert replica_counts([100.0 if e == 5 else 4.0 for e in range(8)], 4, 12) == [2, 1, 1, 1, 1, 4, 1, 1]
    p = balanced_placement(counts, ep=4, slots_per_rank=3)
    assert len(p.replicas(5)) == 4
    assert max(p.rank_loads(counts)) <= max(Placement.contiguous(8, 4, 1).rank_loads(counts))
    assert max(p.rank_loads(counts)) == 33.0  # 25 + 4 + 4 on two ranks; see the docstring's loads


def test_redundant_zero_is_a_repacking() -> None:
    """Loads 8..1 from one sender over 2 ranks of 4: {8, 7, 2, 1} and {6, 5, 4, 3} give 18 each, contiguous
    gives 26 and 10."""
    counts = [[8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0], [0.0] * 8]
    p = balanced_placement(counts, ep=2, slots_per_rank=4)
    assert not p.is_replicated()
    assert p.rank_loads(counts) == [18.0, 18.0]
    assert Placement.contiguous(8, 2).rank_loads(counts) == [26.0, 10.0]


@pytest.mark.parametrize(
    "N,R,S", [(8, 2, 4), (8, 2, 5), (8, 4, 2), (8, 4, 3), (16, 4, 6), (4, 4, 1), (4, 4, 2)]
)
def test_valid_deterministic_and_never_worse_than_contiguous(N: int, R: int, S: int) -> None:
    rng = random.Random(N * 100 + R * 10 + S)
    for _ in range(5):
        counts = skewed_counts(rng, R, N)
        p = balanced_placement(counts, R, S, version=3)
        assert (p.ep, p.slots_per_rank, p.version) == (R, S, 3)
        assert sorted({e for row in p.slot_expert_RL for e in row}) == list(range(N))
        assert all(len(set(row)) == S for row in p.slot_expert_RL)
        again = balanced_placement([list(row) for row in counts], R, S, version=3)
        assert again == p
        cont = Placement.contiguous(N, R, S - N // R)
        assert max(p.rank_loads(counts)) <= max(cont.rank_loads(counts)) + 1e-9


def test_one_expert_per_rank() -> None:
    counts = [[1.0, 9.0, 2.0, 3.0], [0.0, 5.0, 1.0, 0.0], [0.0, 0.0, 0.0, 4.0], [1.0, 1.0, 1.0, 1.0]]
    p = balanced_placement(counts, ep=4, slots_per_rank=1)
    assert sorted(p.rank_loads(counts)) == [2.0, 4.0, 8.0, 15.0]  # a permutation: the loads as they are
    p2 = balanced_placement(counts, ep=4, slots_per_rank=2)
    assert max(p2.rank_loads(counts)) < 15.0


@pytest.mark.parametrize("S", [2, 3])
def test_zero_loads_give_contiguous(S: int) -> None:
    p = balanced_placement([[0.0] * 8 for _ in range(4)], ep=4, slots_per_rank=S, version=2)
    assert p.slot_expert_RL == Placement.contiguous(8, 4, S - 2).slot_expert_RL and p.version == 2


def test_search_uses_the_exact_replica_rule() -> None:
    """The search's incremental loads equal ``Placement.rank_loads`` on random tables."""
    rng = random.Random(7)
    for R, S in [(2, 5), (4, 3), (4, 4)]:
        for _ in range(10):
            p = random_placement(rng, 8, R, S)
            counts = skewed_counts(rng, R, 8)
            assert _loads([list(r) for r in p.slot_expert_RL], counts) == pytest.approx(p.rank_loads(counts))


def test_moved_slots_and_unchanged_version() -> None:
    rng = random.Random(3)
    counts = skewed_counts(rng, 4, 8)
    old = balanced_placement(counts, 4, 3, version=5)
    new = balanced_placement(counts, 4, 3, version=6, prev=old)
    assert moved_slots(old, new) == []
    assert keep_if_unchanged(old, new) is old
    counts[0][0] += 1000.0
    hot = balanced_placement(counts, 4, 3, version=6, prev=old)
    moved = moved_slots(old, hot)
    assert moved and keep_if_unchanged(old, hot) is hot
    S = 3
    assert all(old.slot_expert_RL[g // S][g % S] != hot.slot_expert_RL[g // S][g % S] for g in moved)
    # prev keeps experts that stay on a rank in their slot
    for r in range(4):
        for s, e in enumerate(hot.slot_expert_RL[r]):
            if e in old.slot_expert_RL[r]:
                assert old.slot_expert_RL[r][s] == e


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ConfigError, match="slots per rank"):
        balanced_placement(TINY, ep=2, slots_per_rank=5)
    with pytest.raises(ConfigError, match="counts_RN"):
        balanced_placement(TINY, ep=4, slots_per_rank=1)
    with pytest.raises(ConfigError, match="divisible"):
        balanced_placement([[1.0] * 3, [1.0] * 3], ep=2, slots_per_rank=2)


# --- migrate ---------------------------------------------------------------------------------------------
def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (so -0.0 != 0.0 and NaN == NaN with the same payload)."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bitwise(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(bits(a), bits(b)), what


ROW_BYTES = 3 * 5 * 8 + 7 * 4  # logical_table: a [3, 5] float64 and b [7] float32 per slot
SEED = 11
_RESULTS: dict[int, list[dict]] = {}


def results_for(world: int) -> list[dict]:
    """One launch per world size, shared by the tests below."""
    if world not in _RESULTS:
        _RESULTS[world] = run_ranks(rebalance_worker, world, SEED, timeout=180)
    return _RESULTS[world]


@pytest.mark.parametrize("world", [2, 4])
def test_migrate_matches_the_oracle(world: int) -> None:
    results = [r["migrate"] for r in results_for(world)]
    table = logical_table(SEED, 8)
    for ci, case in enumerate(migration_cases(world)):
        old, new = case["old"], case["new"]
        remote = [[e not in old.slot_expert_RL[r] for e in new.slot_expert_RL[r]] for r in range(world)]
        for r in range(world):
            got = results[r]["cases"][ci]
            assert got["name"] == case["name"]
            for k, full in table.items():
                want = full[torch.tensor(new.slot_expert_RL[r])]
                assert_bitwise(got["tensors"][k], want, f"{case['name']} rank {r} {k}")
            assert got["bytes_received"] == ROW_BYTES * sum(remote[r])
            assert got["bytes_total"] == ROW_BYTES * sum(map(sum, remote))
            src_first = [  # bytes rank r sends: slots elsewhere whose first old replica is on r
                1
                for d in range(world)
                for e, far in zip(new.slot_expert_RL[d], remote[d], strict=True)
                if far and old.replicas(e)[0][0] == r
            ]
            assert got["bytes_sent"] == ROW_BYTES * len(src_first)
            assert got["slots_changed"] == len(moved_slots(old, new))
        if case["name"] in ("no-op", "reorder"):
            assert all(results[r]["cases"][ci]["bytes_total"] == 0 for r in range(world))
    assert results[0]["cases"][-1]["slots_changed"] == 0  # the no-op
    assert all(results[r]["balanced"] == results[0]["balanced"] for r in range(world))


@pytest.mark.parametrize("world", [2, 4])
def test_migrate_layers_moves_weights_and_adamw_state_exactly(world: int) -> None:
    results = [r["adamw"] for r in results_for(world)]
    for li in range(2):
        old = Placement.from_dict(results[0]["olds"][li])
        new = Placement.from_dict(results[0]["news"][li])
        # the oracle: one logical table per tensor, from the first replica; replicas agree bit for bit
        table: dict[str, dict[int, torch.Tensor]] = {}
        for e in range(8):
            for r, s in old.replicas(e):
                for k, v in results[r]["before"][li].items():
                    row = v if v.dim() == 0 else v[s]
                    if e in table.setdefault(k, {}):
                        assert_bitwise(row, table[k][e], f"replicas of expert {e} differ in {k}")
                    table[k][e] = row
        for r in range(world):
            assert results[r]["placements"][li] == new.to_dict()
            for k, v in results[r]["after"][li].items():
                for s, e in enumerate(new.slot_expert_RL[r]):
                    assert_bitwise(v if v.dim() == 0 else v[s], table[k][e], f"L{li} rank {r} slot {s} {k}")
            assert set(results[r]["after"][li]) == {
                f"{w}{k}" for w in ("w1", "w2") for k in ("", ".exp_avg", ".exp_avg_sq", ".step")
            }
    for r in range(world):
        assert results[r]["same_objects"]
        assert results[r]["bytes_total"] > 0 and results[r]["seconds"] >= 0


def test_no_gain_keeps_the_previous_table() -> None:
    """One expert per rank: every permutation computes the same loads, so the table in use stays (a greedy
    start would have moved the heaviest expert to rank 0)."""
    counts = [[1.0, 2.0, 3.0, 9.0]] * 4
    prev = Placement(4, ((2,), (3,), (0,), (1,)), version=4)
    p = balanced_placement(counts, ep=4, slots_per_rank=1, version=5, prev=prev)
    assert p.slot_expert_RL == prev.slot_expert_RL and keep_if_unchanged(prev, p) is prev
    assert balanced_placement(counts, ep=4, slots_per_rank=1).slot_expert_RL[0] == (3,)
