"""Expert-parallel layer vs the plain single-process fp64 oracle: outputs, every gradient, global stats.

Each world size is launched once (module-scoped) and runs every case; each case is then its own test.
"""

from __future__ import annotations

import dataclasses
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
DEDUP_TWINS = (
    "softmax-k1-cap",
    "sigmoid-k2-dropless",
    "exp-k2-cap",
    "tight-capacity",
    "empty-rank-cap",
    "empty-rank-dropless",
    "k8-dropless",
    "k8-cap",
)


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
        # K = N: every token on every rank (dedup's best case); cf 0.5 drops half of each expert's pairs
        Case("k8-dropless", dict(BASE, top_k=8, score_func="sigmoid"), TOKENS[world], seed=19),
        Case("k8-cap", dict(BASE, top_k=8, capacity_factor=0.5), TOKENS[world], seed=20),
    ]
    # MoEConfig.dispatch="dedup" (issue 27): twins of the cases above, each token sent once per rank
    out += [
        dataclasses.replace(c, name=f"dedup-{c.name}", cfg=dict(c.cfg, dispatch="dedup"))
        for c in out
        if c.name in DEDUP_TWINS
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
        assert ref["dropped"] > 0, "the capacity-0.5 cases must actually drop"


@pytest.mark.parametrize("world", [1, 2, 4])
def test_dedup_matches_pairs(world: int) -> None:
    """dispatch="dedup" against "pairs" on the same case: outputs and every gradient to fp64 summation
    order, the same global stats; never more rows on the wire, and fewer once a token has 2+ pairs on
    another rank (K = 8 at EP 2 and 4); nothing on the wire at EP 1."""
    names = [c.name for c in cases(world)]
    res = results_for(world)
    for twin in DEDUP_TWINS:
        i, j = names.index(twin), names.index(f"dedup-{twin}")
        for r in range(world):
            pairs, dedup = res[r][i], res[r][j]
            for key in ("hidden", "grad_x", "grad_router", "grad_w1", "grad_w2", "aux", "f", "P"):
                close(dedup[key], pairs[key], f"{twin} rank {r} {key}")
            assert torch.equal(dedup["counts"], pairs["counts"]) and dedup["dropped"] == pairs["dropped"]
            assert dedup["wire_rows"] <= pairs["wire_rows"], twin
            if world == 1:
                assert pairs["wire_rows"] == dedup["wire_rows"] == 0
    k8 = names.index("k8-dropless")
    if world > 1:
        for r in range(world):
            if TOKENS[world][r]:
                # K = N = 8: pairs sends each token's L = 8/R pairs per other rank, dedup one row
                assert res[r][k8]["wire_rows"] == TOKENS[world][r] * (world - 1) * 8 // world
                assert res[r][names.index("dedup-k8-dropless")]["wire_rows"] == TOKENS[world][r] * (world - 1)


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


@pytest.mark.parametrize(("capacity", "dispatch"), [(None, "pairs"), (1.0, "pairs"), (1.0, "dedup")])
def test_dispatch_counts_ride_the_statistics_all_reduce(capacity: float | None, dispatch: str) -> None:
    """With the balance group holding the EP group, the per-rank dispatch counts travel in the statistics
    all-reduce: the forward issues two all-to-alls (rows out and back) instead of three, with bit-equal
    outputs and gradients (kept counts under a capacity too). dedup too: its token rows per rank ride the
    same block, and its pair lists the rows' all-to-all."""
    cfg = dict(num_experts=8, top_k=2, d_model=16, d_ff=32, capacity_factor=capacity, dispatch=dispatch)
    case = Case("fold", cfg, [24, 40])
    for rank_out in run_ranks(folded_counts_worker, 2, case):
        folded, plain = rank_out[True], rank_out[False]
        assert (folded["forward_a2a"], plain["forward_a2a"]) == (2, 3)
        assert torch.equal(folded["hidden"], plain["hidden"])
        for a, b in zip(folded["grads"], plain["grads"], strict=True):
            assert torch.equal(a, b)
