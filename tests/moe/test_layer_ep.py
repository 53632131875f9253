"""Expert-parallel layer vs the plain single-process fp64 oracle: outputs, every gradient, global stats.

Each world size is launched once (module-scoped) and runs every case; each case is then its own test.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from tests.helpers.asserts import assert_layer_matches_oracle, close
from tests.helpers.launch import run_ranks
from tests.helpers.oracle import Case, make_tensors, oracle
from tests.helpers.workers import accumulation_worker, folded_counts_worker, layer_case_worker

BASE = dict(num_experts=8, d_model=16, d_ff=32, aux_loss_coef=1e-2, z_loss_coef=1e-3, cv_importance_coef=1e-2)
TOKENS = {1: [37], 2: [24, 40], 4: [20, 33, 16, 28]}
# one rank with no tokens at all (at world 1: the whole call is empty)
EMPTY_RANK = {1: [0], 2: [0, 40], 4: [20, 0, 16, 28]}
# every balancing term at once, and the selection bias
ALL_TERMS = dict(BASE, top_k=2, seq_aux_loss_coef=1e-2, bias_update_rate=1e-3)


def cases(world: int) -> list[Case]:
    out = []
    for g in ("softmax", "sigmoid", "exp"):
        for k in (1, 2):
            for cap in (None, 1.0):
                name = f"{g}-k{k}-{'cap' if cap else 'dropless'}"
                out.append(
                    Case(
                        name,
                        dict(BASE, score_func=g, top_k=k, capacity_factor=cap),
                        TOKENS[world],
                        seed=zlib.crc32(name.encode()) % 1000,
                    )
                )
    out += [
        Case("equal-tokens", dict(BASE, top_k=2), [32] * world, seed=11),
        Case("local-scope", dict(BASE, top_k=2, balance_scope="local"), TOKENS[world], seed=12),
        Case(
            "normalize-topk",
            dict(BASE, top_k=2, score_func="sigmoid", normalize_topk=True),
            TOKENS[world],
            seed=13,
        ),
        Case(
            "bias-steers",
            dict(BASE, top_k=2, score_func="sigmoid", bias_update_rate=1e-3),
            TOKENS[world],
            seed=14,
            bias_scale=0.3,
        ),
        Case(
            "tight-capacity",
            dict(BASE, top_k=2, score_func="exp", capacity_factor=0.5),
            TOKENS[world],
            seed=15,
        ),
        Case(
            "no-residual-relu", dict(BASE, top_k=2, residual=False, activation="relu"), TOKENS[world], seed=16
        ),
        # a rank with zero tokens contributes nothing: C = ceil(cf K 0 / N) = 0, no sequence, no rows
        Case(
            "empty-rank-cap", dict(ALL_TERMS, capacity_factor=1.0), EMPTY_RANK[world], seed=17, bias_scale=0.3
        ),
        Case("empty-rank-dropless", ALL_TERMS, EMPTY_RANK[world], seed=18, bias_scale=0.3),
    ]
    return out


_RESULTS: dict[int, list] = {}


def results_for(world: int) -> list:
    if world not in _RESULTS:
        _RESULTS[world] = run_ranks(layer_case_worker, world, cases(world), timeout=300)
    return _RESULTS[world]


PARAMS = [(w, i, c.name) for w in (1, 2, 4) for i, c in enumerate(cases(w))]


@pytest.mark.parametrize("world,idx,name", PARAMS, ids=[f"R{w}-{n}" for w, _, n in PARAMS])
def test_matches_oracle(world: int, idx: int, name: str) -> None:
    case = cases(world)[idx]
    ref = oracle(case, make_tensors(case))
    per_rank = [r[idx] for r in results_for(world)]
    N = case.cfg["num_experts"]
    assert_layer_matches_oracle(case, per_rank, ref)
    assert float(ref["f"].sum()) == pytest.approx(N if sum(case.tokens) else 0)
    if case.cfg.get("capacity_factor") == 0.5:
        assert ref["dropped"] > 0, "the tight-capacity case must actually drop"


@pytest.mark.parametrize("world", [1, 2])
def test_global_batch_running_f(world: int) -> None:
    """global_batch scope: micro-batch m uses f over micro-batches 1..m (all ranks); the final window's f
    equals the oracle's f over the whole step."""
    micro = 3
    case = Case("acc", dict(BASE, top_k=2, balance_scope="global_batch"), [30] * world, seed=21)
    res = run_ranks(accumulation_worker, world, case, micro)
    t = make_tensors(case)
    N, K = 8, 2
    chunks = [x.chunk(micro) for x in t["xs"]]
    seen_counts = torch.zeros(N, dtype=torch.float64)
    seen_T = 0
    for m in range(micro):
        u = torch.cat([c[m] for c in chunks])
        logits = u @ t["router"].t()
        s = torch.softmax(logits, dim=-1)
        chosen = torch.zeros_like(s, dtype=torch.bool).scatter_(1, torch.topk(s, K).indices, True)
        seen_counts += chosen.sum(0)
        seen_T += u.shape[0]
        f_run = N / (K * seen_T) * seen_counts
        P = s.mean(0)
        for r in range(world):
            close(res[r]["switch"][m], 1e-2 * (f_run * P).sum(), f"rank {r} micro-batch {m} switch term")
    f_final = N / (K * seen_T) * seen_counts
    for r in range(world):
        got_f = N / (K * res[r]["window_tokens"]) * res[r]["window_counts"]
        close(got_f, f_final, f"rank {r} final step f")
        assert torch.equal(res[r]["used"], res[r]["window_counts"])
        assert float(res[r]["after_reset"].abs().sum()) == 0.0


@pytest.mark.parametrize("capacity", [None, 1.0])
def test_dispatch_counts_ride_the_statistics_all_reduce(capacity: float | None) -> None:
    """With the balance group holding the EP group, the per-rank dispatch counts travel in the statistics
    all-reduce: the forward issues two all-to-alls (rows out and back) instead of three, with bit-equal
    outputs and gradients (kept counts under a capacity too)."""
    case = Case("fold", dict(num_experts=8, top_k=2, d_model=16, d_ff=32, capacity_factor=capacity), [24, 40])
    for rank_out in run_ranks(folded_counts_worker, 2, case):
        folded, plain = rank_out[True], rank_out[False]
        assert (folded["forward_a2a"], plain["forward_a2a"]) == (2, 3)
        assert torch.equal(folded["hidden"], plain["hidden"])
        for a, b in zip(folded["grads"], plain["grads"], strict=True):
            assert torch.equal(a, b)
