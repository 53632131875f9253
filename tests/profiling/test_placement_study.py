"""The placement study (#14) must not rot: a tiny run on 2 gloo ranks gives every row and field, finite, and
the balanced placements are never predicted worse than the contiguous one. No speed asserted."""

from __future__ import annotations

import json
import math
from pathlib import Path

from moe_dist.runtime.spawn import run_ranks
from profiling.bench.placement_study import StudyOptions, report, study
from profiling.bench.sweep import SweepSpec

FIELDS = (
    "predicted_load_ratio",
    "measured_load_ratio",
    "step_ms",
    "vs_contiguous",
    "straggler_ms",
    "straggler_frac",
    "replica_sync_ms_min",
    "replica_sync_ms_max",
    "migration_ms",
    "migration_bytes",
)


def test_placement_study_smoke(tmp_path: Path) -> None:
    spec = SweepSpec(tokens=128, d_model=32, d_ff=64, steps=2, warmup=1, top_k=1, hot_experts=1)
    opts = StudyOptions(loads=[1.0, 2.0], redundant=[0, 1], spec=spec, count_steps=1, migrate_reps=1)
    res = run_ranks(study, 2, opts, timeout=120)[0]
    doc = report(res, tmp_path)
    rows = doc["rows"]
    assert [(r["load"], r["placement"]) for r in rows] == [
        (load, p) for load in (1.0, 2.0) for p in ("contiguous", "balanced+0", "balanced+1")
    ]
    for r in rows:
        for key in FIELDS:
            assert math.isfinite(r[key]), (r["placement"], key, r[key])
        assert r["step_ms"] > 0 and r["migration_ms"] >= 0
        contiguous = next(c for c in rows if c["load"] == r["load"] and c["placement"] == "contiguous")
        assert r["predicted_load_ratio"] <= contiguous["predicted_load_ratio"] + 1e-9, r
    # the one-hot router routes exactly: the measured rank loads are the predicted ones
    assert all(abs(r["measured_load_ratio"] - r["predicted_load_ratio"]) < 1e-6 for r in rows)
    hot = [r for r in rows if r["load"] == 2.0]
    assert hot[0]["predicted_load_ratio"] == 2.0 and hot[2]["predicted_load_ratio"] < 2.0
    assert hot[2]["replica_sync_ms_max"] > 0  # balanced+1 holds replicas: the sync ran
    assert len(doc["whatif"]) == len(rows)
    for p in doc["whatif"]:
        for tag in ("measured", "10x"):
            assert math.isfinite(p[tag]["straggler_frac"]) and p[tag]["step_ms"] > 0
    saved = json.loads((tmp_path / "placement_study.json").read_text())
    assert len(saved["rows"]) == len(rows)
    assert (tmp_path / "placement_study.md").read_text().startswith("| max/mean load |")
    assert (tmp_path / "whatif" / "load2" / "routing.jsonl").exists()
