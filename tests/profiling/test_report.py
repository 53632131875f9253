"""The offline report (profiling.analysis.report) on a real 2-rank run, and the what-if projection
(profiling.analysis.whatif)
on a hand-made trace whose costs and loads are known exactly."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from profiling.analysis import report, whatif
from profiling.runtime.analysis import StragglerAnalyzer
from profiling.runtime.record import StepExtras
from tests.helpers.launch import run_ranks
from tests.training.train_workers import tiny, train_worker

PNG_MIN_BYTES = 5_000


# --- a real run ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("runs")
    cfg = tiny(out_dir=str(tmp_path), name="r", parallel={"ep": 2}, train={"steps": 8})
    run_ranks(train_worker, 2, cfg, timeout=300)
    run_dir = tmp_path / "r"
    assert (run_dir / "straggler.jsonl").exists()
    return run_dir


@pytest.fixture(scope="module")
def real_report(real_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    path = report.make_report(real_run, out)
    assert path == out / "report.md"
    return path


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def layer_rows(md: str) -> dict[int, list[str]]:
    """The per-layer table's cells, keyed by layer (the first table whose rows carry 11+ cells)."""
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 11 and re.fullmatch(r"L\d+", cells[0]) and int(cells[0][1:]) not in rows:
            rows[int(cells[0][1:])] = cells
    return rows


def number(md: str, pattern: str) -> float:
    m = re.search(pattern, md)
    assert m, f"{pattern!r} not in report"
    return float(m.group(1))


def test_report_writes_valid_plots(real_run: Path, real_report: Path) -> None:
    layers = [e["layer"] for e in jsonl(real_run / "straggler.jsonl")[0]["layers"]]
    assert layers == [0, 1]
    names = [f"load_heatmap_L{layer}.png" for layer in layers] + [
        "rank_breakdown.png",
        "straggler_vs_load.png",
    ]
    md = real_report.read_text()
    for name in names:
        path = real_report.parent / name
        assert path.stat().st_size > PNG_MIN_BYTES, name
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] >= 300 and im.size[1] >= 200, (name, im.size)
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 100, f"{name} is (nearly) blank"
        assert f"]({name})" in md, f"report.md does not link {name}"


def test_report_numbers_match_straggler_jsonl(real_run: Path, real_report: Path) -> None:
    recs = jsonl(real_run / "straggler.jsonl")
    md = real_report.read_text()
    # overall fractions: ratio of sums, and the mean of the trainer's per-step straggler_frac
    ratio = sum(r["straggler_ms"] for r in recs) / sum(r["step_ms"] for r in recs)
    per_step = sum(r["straggler_frac"] for r in recs) / len(recs)
    assert number(md, r"Straggler fraction of step time: ([\d.]+) %") == pytest.approx(100 * ratio, abs=0.006)
    assert number(md, r"mean of per-step fractions: ([\d.]+) %") == pytest.approx(100 * per_step, abs=0.006)
    mean_step = sum(r["step_ms"] for r in recs) / len(recs)
    assert number(md, r"Mean step time: ([\d.]+) ms") == pytest.approx(mean_step, abs=6e-4)
    assert f"Steps profiled: {len(recs)}" in md

    rows = layer_rows(md)
    all_S = all_X = 0.0
    for li, layer in enumerate(e["layer"] for e in recs[0]["layers"]):
        assert layer in rows, f"layer {layer} missing from the per-layer table"
        cells = rows[layer]
        ranks = []
        S_layer = X_layer = 0.0
        for col, phase in ((1, "fwd"), (2, "bwd")):
            S = [r["layers"][li][phase]["straggler_ms"] for r in recs]
            assert float(cells[col]) == pytest.approx(sum(S) / len(S), abs=6e-4), (layer, phase)
            n = [x for r in recs for x in r["layers"][li]["n"]]
            E = [x for r in recs for x in r["layers"][li][phase]["E"]]
            c, a = np.polyfit(n, E, 1)
            c_col = 6 if phase == "fwd" else 8
            assert float(cells[c_col]) == pytest.approx(c, rel=2e-3, abs=1e-9), (layer, phase)
            assert float(cells[c_col - 1]) == pytest.approx(a, abs=2e-3), (layer, phase)
            for r in recs:
                e = r["layers"][li]
                ranks.append(e[phase]["rank"])
                gap = max(e["n"]) - sum(e["n"]) / len(e["n"])
                X_layer += min(max(c * gap, 0.0), e[phase]["straggler_ms"])
                S_layer += e[phase]["straggler_ms"]
        hist = ", ".join(f"r{k}: {ranks.count(k)}" for k in range(2))
        assert cells[3] == hist
        top = max(range(2), key=lambda k: (ranks.count(k), -k))
        assert cells[4] == f"r{top}"
        assert float(cells[9].rstrip(" %")) == pytest.approx(100 * X_layer / S_layer, abs=0.006)
        all_S, all_X = all_S + S_layer, all_X + X_layer
    explained = number(md, r"Token-explained fraction \(final whole-run fit\): ([\d.]+) %")
    assert explained == pytest.approx(100 * all_X / all_S, abs=0.006)
    balanced = number(md, r"Balanced-step estimate[^:]*: ([\d.]+) ms")
    assert balanced == pytest.approx(mean_step - all_X / len(recs), abs=6e-4)
    assert "Capacity mode" not in md


def test_report_capacity_mode(real_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "cap"
    shutil.copytree(real_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    recs = jsonl(run / "straggler.jsonl")
    for r in recs:
        r["dropped"] = [3, 5]
        r["capacity_padding"] = [10.0, 30.0]
    (run / "straggler.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    report.main([str(run)])  # the command line, default --out = the run directory
    md = (run / "report.md").read_text()
    assert "## Capacity mode" in md and "dropped/step | padding rows/step" in md
    rows = layer_rows(md)
    assert rows[0][-2:] == ["3.0", "10.0"] and rows[1][-2:] == ["5.0", "30.0"]


def test_whatif_on_the_real_run(real_run: Path) -> None:
    """At the recorded size (world = EP = 2) the routing counts give back the recorded per-rank loads, so
    the contiguous projection equals the cost model applied to the recorded loads; 4 experts cannot go
    on 8 ranks."""
    rows = whatif.project(real_run, [2, 4, 8], ["contiguous", "greedy"])
    assert [(r["ep"], r["placement"]) for r in rows] == [
        (2, "contiguous"),
        (2, "greedy"),
        (4, "contiguous"),
        (4, "greedy"),
        (8, None),
    ]
    assert rows[-1]["skipped"] == "skipped: 4 experts cannot be split over 8 ranks (fewer experts than ranks)"
    run = report.load_run(real_run)
    base = whatif.recorded(run, whatif.cost_models(run))
    assert rows[0]["straggler_ms"] == pytest.approx(base["model_straggler_ms"], rel=1e-9, abs=1e-9)
    assert rows[0]["step_ms"] == pytest.approx(
        base["step_ms"] - base["sum_max_E_ms"] + rows[0]["sum_max_E_ms"], rel=1e-12
    )


# --- a hand-made trace ---------------------------------------------------------------------------------
# 8 experts, recorded on 2 ranks (contiguous, experts 0-3 on rank 0), MoE layers 1 and 3, two steps.
# Costs exactly E_fwd = 1 + 0.01 n, E_bwd = 2 + 0.02 n.
LAYERS = [1, 3]
COUNTS = [  # step -> layer -> per-expert global counts
    [[400, 200, 100, 100, 50, 50, 50, 50], [125] * 8],
    [[400, 200, 100, 100, 50, 50, 50, 50], [300] + [100] * 7],
]
STEP_MS = [100.0, 120.0]


def write_synthetic(run: Path) -> Path:
    run.mkdir(parents=True)
    cfg = {
        "name": "synthetic",
        "model": {"seq_len": 125, "moe": {"num_experts": 8, "top_k": 2}},
        "parallel": {"ep": 2},
        "train": {"micro_batch": 2, "grad_accum": 1},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    analyzer = StragglerAnalyzer(LAYERS, world=2)
    with open(run / "straggler.jsonl", "w") as s, open(run / "routing.jsonl", "w") as r:
        for step, (counts, step_ms) in enumerate(zip(COUNTS, STEP_MS, strict=True)):
            data = torch.zeros(2, len(LAYERS), 5, dtype=torch.float64)  # FIELDS: E_fwd E_bwd A_dis A_com n
            for li, c in enumerate(counts):
                for rank in range(2):
                    n = sum(c[4 * rank : 4 * rank + 4])
                    data[rank, li] = torch.tensor([1 + 0.01 * n, 2 + 0.02 * n, 0.5, 1.0, n])
            rec = analyzer.update(step, step_ms, data)
            rec["dropped"] = [0, 0]
            s.write(json.dumps(rec) + "\n")
            r.write(json.dumps({"step": step, "tokens_per_expert": counts}) + "\n")
    return run


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    return write_synthetic(tmp_path / "syn")


# Hand computation (see the module docstring of profiling.analysis.whatif). Recorded mean step 110 ms;
# recorded
# sum over layers and phases of max_r E_r: step 0: 9 + 18 + 6 + 12 = 45, step 1: 27 + 7 + 14 = 48 -> 46.5.
# Each entry: (mean straggler ms, mean projected sum of max E); step = 110 - 46.5 + sum max E.
#   EP 2 contiguous: L1 n=[800,200] -> 3+6 per step; L3 [500,500] then [600,400] -> 0, 1+2.
#   EP 2 round_robin: L1 [600,400] -> 1+2; L3 [500,500], [600,400] -> 0, 3.
#   EP 2 greedy: L1 {0,4,5,6} vs {1,2,3,7} -> [550,450] -> 0.5+1; L3 (mean loads 212.5, 112.5...)
#                {0,3,5,7} vs {1,2,4,6} -> [500,500], [600,400] -> 0, 3.
#   EP 4 (counts x2) contiguous: L1 [1200,400,200,200] -> 7+14; L3 step 1 [800,400,400,400] -> 3+6.
#   EP 4 round_robin = greedy: L1 [900,500,300,300] -> 4+8; L3 step 1 [800,400,400,400] -> 3+6.
#   EP 8 (counts x4): L1 [1600,800,400,400,200x4] -> 11+22; L3 step 1 [1200,400x7] -> 7+14.
EXPECTED = {
    (2, "contiguous"): (10.5, 46.5),
    (2, "round_robin"): (4.5, 40.5),
    (2, "greedy"): (3.0, 39.0),
    (4, "contiguous"): (25.5, 61.5),
    (4, "round_robin"): (16.5, 52.5),
    (4, "greedy"): (16.5, 52.5),
    (8, "contiguous"): (43.5, 79.5),
    (8, "round_robin"): (43.5, 79.5),
    (8, "greedy"): (43.5, 79.5),
}


def test_whatif_matches_hand_computation(synthetic: Path) -> None:
    rows = whatif.project(synthetic, [2, 4, 8, 16, 3], list(whatif.PLACEMENTS))
    done = {(r["ep"], r["placement"]): r for r in rows if not r["skipped"]}
    assert set(done) == set(EXPECTED)
    for key, (straggler, summax) in EXPECTED.items():
        r = done[key]
        step = 110.0 - 46.5 + summax
        assert r["straggler_ms"] == pytest.approx(straggler, abs=1e-9), key
        assert r["sum_max_E_ms"] == pytest.approx(summax, abs=1e-9), key
        assert r["step_ms"] == pytest.approx(step, abs=1e-9), key
        assert r["straggler_frac"] == pytest.approx(straggler / step, abs=1e-12), key
    skipped = [r["skipped"] for r in rows if r["skipped"]]
    assert skipped == [
        "skipped: 8 experts cannot be split over 16 ranks (fewer experts than ranks)",
        "skipped: 8 experts cannot be split over 3 ranks",
    ]
    greedy_l1 = done[(2, "greedy")]["layers"][0]
    assert greedy_l1["layer"] == 1 and greedy_l1["owner"] == [0, 1, 1, 1, 0, 1, 0, 0]
    assert done[(4, "contiguous")]["layers"][0]["owner"] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert done[(4, "round_robin")]["layers"][0]["owner"] == [0, 1, 2, 3, 0, 1, 2, 3]


def test_greedy_never_worse_than_contiguous(synthetic: Path) -> None:
    rows = whatif.project(synthetic, [2, 4, 8], ["contiguous", "greedy"])
    by = {(r["ep"], r["placement"]): r for r in rows}
    for ep in (2, 4, 8):
        greedy, contiguous = by[(ep, "greedy")], by[(ep, "contiguous")]
        assert greedy["straggler_ms"] <= contiguous["straggler_ms"] + 1e-12, ep
        assert greedy["load_ratio"] <= contiguous["load_ratio"] + 1e-12, ep
    assert by[(2, "greedy")]["straggler_ms"] < by[(2, "contiguous")]["straggler_ms"]


def test_whatif_recorded_size_reproduces_the_trace(synthetic: Path) -> None:
    run = report.load_run(synthetic)
    base = whatif.recorded(run, whatif.cost_models(run))
    assert base["straggler_ms"] == pytest.approx(10.5, abs=1e-9)
    assert base["model_straggler_ms"] == pytest.approx(10.5, abs=1e-9)
    assert base["sum_max_E_ms"] == pytest.approx(46.5, abs=1e-9)
    assert base["step_ms"] == pytest.approx(110.0)


def test_whatif_command_line(synthetic: Path, capsys: pytest.CaptureFixture[str]) -> None:
    whatif.main([str(synthetic), "--ep", "4", "16", "--placement", "contiguous", "greedy"])
    out = capsys.readouterr().out
    assert "skipped: 8 experts cannot be split over 16 ranks" in out
    line = next(x for x in out.splitlines() if x.split()[:2] == ["4", "contiguous"])
    assert line.split()[-1] == f"{100 * 25.5 / 125.0:.2f}"
    saved = json.loads((synthetic / "whatif.json").read_text())
    assert [r["placement"] for r in saved["rows"]] == ["contiguous", "greedy", None]
    assert any("weak scaling" in a for a in saved["assumptions"])


def test_whatif_table_names_its_baseline(synthetic: Path, capsys: pytest.CaptureFixture[str]) -> None:
    whatif.main([str(synthetic), "--ep", "4", "--placement", "contiguous"])
    out = capsys.readouterr().out
    assert "baseline (every row is projected from it): the recorded run, world 2, EP 2, placement" in out
    assert "placement contiguous, 8 experts" in out
    assert "x base" in next(x for x in out.splitlines() if x.split()[:2] == ["EP", "placement"])
    line = next(x for x in out.splitlines() if x.split()[:2] == ["4", "contiguous"]).split()
    # recorded mean step 110 ms; EP 4 contiguous projects 125 ms (the hand computation above)
    assert line[-3:-1] == ["125.000", f"{125.0 / 110.0:.3f}"]


def test_report_on_the_hand_made_trace(synthetic: Path) -> None:
    """Exact costs: the fit is a = 1, 2 and c = 0.01, 0.02; all straggler time is token-explained."""
    md = report.make_report(synthetic).read_text()
    rows = layer_rows(md)
    assert set(rows) == {1, 3}
    for cells in rows.values():
        assert [float(x) for x in cells[5:9]] == pytest.approx([1.0, 0.01, 2.0, 0.02], abs=1e-9)
        assert cells[9] == "100.00 %"
    assert rows[1][1:3] == ["3.000", "6.000"] and rows[3][1:3] == ["0.500", "1.000"]
    assert number(md, r"Straggler fraction of step time: ([\d.]+) %") == pytest.approx(
        100 * 21 / 220, abs=0.006
    )
    for name in ("load_heatmap_L1.png", "load_heatmap_L3.png", "rank_breakdown.png", "straggler_vs_load.png"):
        assert (synthetic / name).stat().st_size > PNG_MIN_BYTES


def test_measured_wire_bytes_reach_the_report_and_the_whatif(real_run: Path, real_report: Path) -> None:
    """Every straggler.jsonl step carries each MoE layer's measured dispatch all-to-all (``wire_rows`` /
    ``wire_bytes``, summed over the ranks by the profiler's gather): for this pairs run in fp32, 4·D bytes a
    row, and no more rows than the step's (token, expert) pairs; the report states their mean per step and
    layer, the what-if's baseline their total, and a row written before the keys existed reads as none."""
    run = report.load_run(real_run)
    d = run.config["model"]["d_model"]
    routing = {r["step"]: r["tokens_per_expert"] for r in jsonl(real_run / "routing.jsonl")}
    recs = jsonl(real_run / "straggler.jsonl")
    for rec in recs:
        assert len(rec["wire_rows"]) == len(rec["wire_bytes"]) == len(run.layers)
        for li, (rows, nbytes) in enumerate(zip(rec["wire_rows"], rec["wire_bytes"], strict=True)):
            assert nbytes == rows * d * 4 and 0 < rows <= sum(routing[rec["step"]][li]), (rec["step"], li)
    md = real_report.read_text()
    total = sum(sum(r["wire_bytes"]) for r in recs) / len(recs)
    assert number(md, r"moe\.dispatch: pairs` per step.*?: ([\d.]+) MB in all MoE layers") == pytest.approx(
        total / 1e6, abs=5e-4
    )
    for li, layer in enumerate(run.layers):
        section = md.split("## All-to-all bytes (measured)")[1]
        cells = re.search(rf"\| L{layer} \| ([\d.]+) \| ([\d.]+) \|", section).groups()
        assert float(cells[0]) == pytest.approx(sum(r["wire_rows"][li] for r in recs) / len(recs), abs=0.05)
    base = whatif.recorded(run, whatif.cost_models(run))
    assert base["a2a_bytes_measured"] == pytest.approx(total, rel=1e-12)
    assert "measured dispatch all-to-all" in whatif.format_table(base, [])
    old = {k: v for k, v in recs[0].items() if not k.startswith("wire_")}
    assert StepExtras.from_jsonl(old).wire is None
    assert "wire_rows" not in StepExtras.from_jsonl(old).to_jsonl()


def test_whatif_states_a_dedup_runs_measured_bytes_at_the_recorded_ep(real_run: Path, tmp_path: Path) -> None:
    """Per-expert counts cannot tell dedup's rows, so the what-if's a2a column is empty for a dedup run
    except at the recorded EP size and placement, where it is the run's measured ``wire_bytes`` (the same
    run's records, relabelled ``moe.dispatch: dedup``)."""
    run = tmp_path / "dedup"
    shutil.copytree(real_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["moe"]["dispatch"] = "dedup"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    recs = jsonl(run / "straggler.jsonl")
    measured = sum(sum(r["wire_bytes"]) for r in recs) / len(recs)
    rows = {(r["ep"], r["placement"]): r for r in whatif.project(run, [2, 4], ["contiguous", "greedy"])}
    assert rows[(2, "contiguous")]["a2a_measured"] is True
    assert rows[(2, "contiguous")]["a2a_bytes"] == pytest.approx(measured, rel=1e-12)
    for key in ((2, "greedy"), (4, "contiguous")):
        assert rows[key]["a2a_bytes"] is None and rows[key]["a2a_measured"] is False, key
