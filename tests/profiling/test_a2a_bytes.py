"""The a2a-bytes tool's counts (profiling/analysis/a2a_bytes.py) and the what-if's all-to-all projection
(profiling/analysis/whatif.py) against hand counts on tiny routings.

Three tokens, K = 2 of N = 4 experts: t0 -> {0, 1}, t1 -> {0, 2}, t2 -> {2, 3}. At EP 2 (experts 0, 1 on
rank 0; 2, 3 on rank 1) a rank-0 batch sends (t1, e2), (t2, e2), (t2, e3) to rank 1: 3 pair rows, 2 token
rows (t1 and t2 once each). With capacity 0.5, C = ceil(0.5 * 2 * 3 / 4) = 1 per expert, kept by score:
(t0, e0), (t0, e1), (t1, e2), (t2, e3); rank 0 then sends (t1, e2) and (t2, e3): 2 pair rows, 2 token rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from moe_dist.moe.placement import Placement
from profiling.analysis import whatif
from profiling.analysis.a2a_bytes import PAIR_LIST_BYTES, Rows, batch_rows, projected_rows
from tests.profiling.test_report import write_synthetic

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


@pytest.mark.parametrize("dispatch", ["pairs", "dedup"])
def test_whatif_counts_the_configured_dispatch(tmp_path: Path, dispatch: str, capsys) -> None:
    """The hand-made trace of test_report (2 ranks, 2 MoE layers of 1,000 pairs per step each): at EP R'
    weak scaling gives 2,000 R'/2 pairs per step, of which 1 - 1/R' cross, x D = 16 x 4 bytes; under dedup
    the counts cannot tell, and the what-if says so instead of counting pairs."""
    run = write_synthetic(tmp_path / "syn")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"].update(d_model=16)
    cfg["model"]["moe"]["dispatch"] = dispatch
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    whatif.main([str(run), "--ep", "2", "4", "--placement", "contiguous", "greedy"])
    rows = json.loads((run / "whatif.json").read_text())["rows"]
    out = capsys.readouterr().out
    for r in rows:
        assert r["dispatch"] == dispatch
        if dispatch == "dedup":
            assert r["a2a_rows"] is None and r["a2a_bytes"] is None
            continue
        want = 2000 * r["ep"] / 2 * (1 - 1 / r["ep"])  # 1,000 at EP 2, 3,000 at EP 4
        assert r["a2a_rows"] == pytest.approx(want)
        assert r["a2a_bytes"] == pytest.approx(want * 16 * 4)
    line = next(x for x in out.splitlines() if x.split()[:2] == ["4", "contiguous"]).split()
    assert line[4] == ("-" if dispatch == "dedup" else f"{3000 * 64 / 1e6:.3f}")
