"""The a2a-bytes tool's counts (profiling/analysis/a2a_bytes.py) against a hand count on a tiny routing.

Three tokens, K = 2 of N = 4 experts: t0 -> {0, 1}, t1 -> {0, 2}, t2 -> {2, 3}. At EP 2 (experts 0, 1 on
rank 0; 2, 3 on rank 1) a rank-0 batch sends (t1, e2), (t2, e2), (t2, e3) to rank 1: 3 pair rows, 2 token
rows (t1 and t2 once each). With capacity 0.5, C = ceil(0.5 * 2 * 3 / 4) = 1 per expert, kept by score:
(t0, e0), (t0, e1), (t1, e2), (t2, e3); rank 0 then sends (t1, e2) and (t2, e3): 2 pair rows, 2 token rows.
"""

from __future__ import annotations

import pytest
import torch

from moe_dist.moe.placement import Placement
from profiling.analysis.a2a_bytes import PAIR_LIST_BYTES, Rows, batch_rows, projected_rows

IDX_TK = torch.tensor([[0, 1], [0, 2], [2, 3]])
SCORES_TK = torch.tensor([[0.9, 0.5], [0.8, 0.7], [0.6, 0.4]])
D = 8


@pytest.mark.parametrize(
    "src,cf,want",
    [
        (0, None, Rows(6, 6, 3, 2)),
        (1, None, Rows(6, 6, 3, 2)),  # (t0, e0), (t0, e1), (t1, e0) to rank 0: t0 and t1 once
        (0, 0.5, Rows(6, 4, 2, 2)),
        (1, 0.5, Rows(6, 4, 2, 1)),  # (t0, e0), (t0, e1): one token row
    ],
)
def test_exact_rows_at_the_run_ep(src: int, cf: float | None, want: Rows) -> None:
    assert batch_rows(IDX_TK, SCORES_TK, Placement.contiguous(4, 2), src, cf) == want


def test_replicas_send_to_the_senders_own_copy() -> None:
    """Rank 0 holds 0, 1, 2 and rank 1 holds 2, 3, 0: each sender's replicas are its own, so rank 0 sends
    only (t2, e3) and rank 1 only (t0, e1)."""
    p = Placement(4, ((0, 1, 2), (2, 3, 0)))
    assert batch_rows(IDX_TK, SCORES_TK, p, 0, None) == Rows(6, 6, 1, 1)
    assert batch_rows(IDX_TK, SCORES_TK, p, 1, None) == Rows(6, 6, 1, 1)


def test_bytes_follow_the_configured_dispatch() -> None:
    rows = Rows(6, 6, 3, 2)
    assert rows.wire_rows("pairs") == 3 and rows.wire_rows("dedup") == 2
    assert rows.wire_bytes("pairs", D) == 3 * D * 4
    assert rows.wire_bytes("dedup", D) == 2 * D * 4 + 3 * PAIR_LIST_BYTES


@pytest.mark.parametrize(
    "ep,cf,pair_rows,token_rows",
    [
        # each kept pair / distinct (token, rank) crosses with probability 1 - 1/ep
        (2, None, 6 * 0.5, 4 * 0.5),  # distinct: t0 {0}, t1 {0, 1}, t2 {1}
        (4, None, 6 * 0.75, 6 * 0.75),  # one expert per rank: every pair is its own row
        (2, 0.5, 4 * 0.5, 3 * 0.5),  # kept: t0 {0}, t1 {1}, t2 {1}
        (1, None, 0.0, 0.0),
    ],
)
def test_projection_to_other_ep_sizes(ep: int, cf: float | None, pair_rows: float, token_rows: float) -> None:
    got = projected_rows(IDX_TK, SCORES_TK, 4, ep, cf)
    assert (got.pair_rows, got.token_rows) == pytest.approx((pair_rows, token_rows))
    assert got.kept == (4 if cf else 6)
