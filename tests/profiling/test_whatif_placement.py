"""What-if for slot placements with replicas (profiling.analysis.whatif_placement) on a hand-made trace,
against
hand-computed numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from moe_dist.moe.placement import Placement
from profiling.analysis import whatif
from profiling.analysis.run_dir import load_run
from profiling.analysis.whatif_placement import (
    CommModel,
    expert_params,
    migration_ms,
    project_placements,
    replica_sync_ms,
)
from profiling.runtime.analysis import StragglerAnalyzer

# 4 experts, recorded on 2 ranks (experts 0-1 on rank 0, 2-3 on rank 1), one MoE layer (model layer 1), two
# steps. Costs exactly E_fwd = 1 + 0.01 n, E_bwd = 2 + 0.02 n. Recorded n = [700, 300] both steps, so the
# recorded sum of max E is 8 + 16 = 24 ms, and the mean step 110 ms. One expert: D=4, F=8, gelu: 4*8 + 8*4
# = 64 parameters = 256 B of fp32 gradient, 768 B with the AdamW state.
COUNTS = [[600, 100, 100, 200], [600, 100, 200, 100]]
COUNTS_RN = [  # the same steps with per-sender counts: sender 1 sends only to expert 2
    [[600, 100, 0, 200], [0, 0, 100, 0]],
    [[600, 100, 0, 100], [0, 0, 200, 0]],
]
STEP_MS = [100.0, 120.0]
GBPS = 1e-4  # 1e5 B/s: 256 B take 2.56 ms
COMM = CommModel(allreduce_gbps=GBPS, a2a_gbps=GBPS, rebalance_every=8)


def write_run(run: Path, per_sender: bool) -> Path:
    run.mkdir(parents=True)
    cfg = {
        "name": "syn",
        "model": {"d_model": 4, "moe": {"num_experts": 4, "top_k": 2, "d_ff": 8, "activation": "gelu"}},
        "parallel": {"ep": 2},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    analyzer = StragglerAnalyzer([1], world=2)
    with open(run / "straggler.jsonl", "w") as s, open(run / "routing.jsonl", "w") as r:
        for step, (counts, step_ms) in enumerate(zip(COUNTS, STEP_MS, strict=True)):
            data = torch.zeros(2, 1, 5, dtype=torch.float64)  # FIELDS: E_fwd E_bwd A_dis A_com n
            for rank in range(2):
                n = sum(counts[2 * rank : 2 * rank + 2])
                data[rank, 0] = torch.tensor([1 + 0.01 * n, 2 + 0.02 * n, 0.5, 1.0, n])
            s.write(json.dumps({**analyzer.update(step, step_ms, data), "dropped": [0]}) + "\n")
            rec = {"step": step, "tokens_per_expert": [counts]}
            if per_sender:
                rec["tokens_per_expert_RN"] = [COUNTS_RN[step]]
            r.write(json.dumps(rec) + "\n")
    return run


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return write_run(tmp_path / "even", per_sender=False)


def inputs(run_dir: Path):
    run = load_run(run_dir)
    costs = whatif.cost_models(run)
    return run, costs, whatif.recorded(run, costs)


GIVEN = Placement(4, ((0, 1, 3), (0, 1, 2)))
"""Experts 0 and 1 on both ranks, 3 on rank 0, 2 on rank 1."""


def test_comm_terms() -> None:
    """Sync: experts 0 and 1 replicated, 2 x 256 B = 512 B -> 5.12 ms. Migration from contiguous
    ((0,1,2), (2,3,0)): rank 0's slot 2 takes expert 3 from rank 1, rank 1's slot 1 takes expert 1 from rank
    0: 2 x 768 B over the group, 768 B sent and received per rank -> 7.68 ms."""
    assert expert_params({"model": {"d_model": 4, "moe": {"d_ff": 8, "activation": "gelu"}}}) == 64
    assert expert_params({"model": {"d_model": 4, "moe": {"d_ff": 8, "activation": "swiglu"}}}) == 96
    assert replica_sync_ms(GIVEN, 64, GBPS) == (512, pytest.approx(5.12))
    assert replica_sync_ms(Placement.contiguous(4, 2), 64, GBPS) == (0, 0.0)
    old = Placement.contiguous(4, 2, 1)
    assert migration_ms(old, GIVEN, 64, GBPS) == (1536, pytest.approx(7.68))
    assert migration_ms(old, old, 64, GBPS) == (0, 0.0)


def test_given_placement_with_an_even_split(run_dir: Path) -> None:
    """Each sender sends half of every count. Step 0: rank 0 computes 300 + 50 (experts 0, 1: own rows) +
    200 (expert 3, both senders) = 550, rank 1 300 + 50 + 100 = 450: straggler 0.5 + 1.0 ms, max E 6.5 + 13
    = 19.5 ms. Step 1 mirrors it (450, 550). Step = 110 - 24 + 19.5 + 5.12 + 7.68 / 8 = 111.58 ms."""
    row = project_placements(*inputs(run_dir), 2, [GIVEN], COMM, 64, name="given")
    assert row["straggler_ms"] == pytest.approx(1.5)
    assert row["sum_max_E_ms"] == pytest.approx(19.5)
    assert row["replica_sync_ms"] == pytest.approx(5.12)
    assert row["migration_ms"] == pytest.approx(7.68)
    assert row["amortised_migration_ms"] == pytest.approx(0.96)
    assert row["step_ms"] == pytest.approx(111.58)
    assert row["straggler_frac"] == pytest.approx(1.5 / 111.58)
    assert row["load_ratio"] == pytest.approx(1.1)
    assert row["layers"][0]["migration_bytes"] == 1536


def test_given_placement_with_logged_senders(tmp_path: Path) -> None:
    """Per-sender counts as logged. Step 0: rank 0 holds 0, 1, 3 and computes its own 600 + 100 + 200 (sender
    1 sends nothing there) = 900, rank 1 its own expert-2 rows, 100: straggler (10 - 6) + (20 - 12) = 12 ms,
    max E 30. Step 1: 800 and 200: 3 + 6 = 9 ms, max E 27. Means 10.5 and 28.5; the replica rule keeps
    sender 0's expert-0 rows on rank 0, so the replicas do not split them."""
    row = project_placements(*inputs(write_run(tmp_path / "rn", True)), 2, [GIVEN], COMM, 64)
    assert row["straggler_ms"] == pytest.approx(10.5)
    assert row["sum_max_E_ms"] == pytest.approx(28.5)
    assert row["load_ratio"] == pytest.approx(1.7)
    assert row["step_ms"] == pytest.approx(110 - 24 + 28.5 + 5.12 + 0.96)


def test_balanced_row(run_dir: Path) -> None:
    """balanced, K=1, from the mean counts (600, 100, 150, 150), contiguous ((0,1,2), (2,3,0)) as the previous
    table: the search reaches 500 / 500 on the mean counts both from EPLB's start and by handing rank 1's
    expert-2 replica to expert 1; the tie goes to the table changing fewer slots: ((0,1,2), (1,3,0)). Per
    step as the even-split case mirrored: 1.5 ms and 19.5 ms; experts 0 and 1 replicated (5.12 ms); one slot
    moves (768 B, 7.68 ms)."""
    rows = whatif.project(run_dir, [2], ["contiguous", "balanced"], whatif.SlotOptions(1, COMM, None))
    row = rows[1]
    assert row["placement"] == "balanced" and row["redundant"] == 1 and row["experts_per_rank"] == 3
    assert row["layers"][0]["slots"] == [[0, 1, 2], [1, 3, 0]]
    assert row["straggler_ms"] == pytest.approx(1.5)
    assert row["layers"][0]["migration_bytes"] == 768
    assert row["step_ms"] == pytest.approx(111.58)
    # the contiguous row is whatif's as before: n = [700, 300] -> (8 - 6) + (16 - 12) = 6 ms
    assert rows[0]["straggler_ms"] == pytest.approx(6.0) and rows[0]["step_ms"] == pytest.approx(110.0)


def test_balanced_without_redundant_slots_keeps_a_layout_as_good(run_dir: Path) -> None:
    """EP 4, K=0 (one expert per rank; counts x 2): every permutation computes the same loads, so the
    contiguous table stays and nothing migrates; straggler (13 - 6) + (26 - 12) = 21 ms both steps."""
    (row,) = whatif.project(run_dir, [4], ["balanced"], whatif.SlotOptions(0, COMM, None))
    assert row["layers"][0]["slots"] == [[0], [1], [2], [3]]
    assert row["straggler_ms"] == pytest.approx(21.0)
    assert row["replica_sync_ms"] == 0.0 and row["migration_ms"] == 0.0


def test_command_line(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(run_dir), "--ep", "2", "--placement", "contiguous", "balanced", "--redundant", "1"]
    whatif.main(args + ["--rebalance-every", "8", "--allreduce-gbps", "1e-4", "--a2a-gbps", "1e-4"])
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.split()[:2] == ["2", "balanced+1"])
    assert line.split()[-1] == f"{100 * 1.5 / 111.58:.2f}"
    assert "replica sync 5.120 ms" in out and "7.680 ms / 8 steps = 0.960 ms" in out
    saved = json.loads((run_dir / "whatif.json").read_text())
    assert any("replica gradients" in a for a in saved["assumptions"])
    whatif.main([str(run_dir), "--ep", "2", "--placement", "balanced", "--redundant", "3"])
    assert "skipped: 3 redundant slots per rank on 2 ranks (4 experts)" in capsys.readouterr().out
