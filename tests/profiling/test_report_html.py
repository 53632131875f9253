"""The report of a run whose experts moved, as a person opens it: ``moe-dist report`` (the console script)
writes report.md and a self-contained report.html, which headless Chromium renders with every plot and
table; the heatmaps follow the placement stored over time; and the rebalance steps keep the one step
convention of the profiler and the JSONL files, with no rebalance after the final step.

One 2-rank run (EP 2, ``placement: balanced``, one redundant slot, a rebalance every 2 steps, 4 steps, a
checkpoint after every step) serves every test here.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from moe_dist.moe.placement import Placement
from profiling.analysis.report_placement import boundaries, placement_history
from tests.helpers.launch import run_ranks
from tests.training.train_workers import tiny, train_worker

STEPS, EVERY = 4, 2


def logged_train_worker(rank: int, world: int, cfg: dict) -> list[str]:
    """``train_worker``, returning the rebalance loop's log lines (rank 0 logs them)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("moe_dist.placement.rebalance")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    train_worker(rank, world, cfg)
    return lines


@pytest.fixture(scope="module")
def moved_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("moved")
    cfg = tiny(
        out_dir=str(out),
        name="moved",
        model={"moe": {"num_experts": 8, "top_k": 2, "d_ff": 16}},
        data={"kind": "synthetic", "max_bytes": 60_000, "zipf_s": 2.0},
        parallel={"ep": 2, "placement": "balanced", "redundant_experts": 1, "rebalance_every": EVERY},
        train={"steps": STEPS, "ckpt_every": 1, "keep_last": STEPS + 2, "eval_every": STEPS},
    )
    logs = run_ranks(logged_train_worker, 2, cfg, timeout=300)
    return out / "moved", logs[0]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_rebalance_steps_share_the_profilers_step_numbers(moved_run: tuple[Path, list[str]]) -> None:
    run, logs = moved_run
    straggler = jsonl(run / "straggler.jsonl")
    assert [r["step"] for r in straggler] == list(range(STEPS))
    migrated = [r["step"] for r in straggler if r["migration_ms"] > 0]
    # after the EVERY-th, 2*EVERY-th, ... step, counted from step 0; none after the final step
    assert migrated == [s for s in range(STEPS - 1) if (s + 1) % EVERY == 0] == [1]
    windows = [r["step"] for r in jsonl(run / "routing.jsonl") if "rebalance_window_steps" in r]
    assert windows == migrated
    logged = [int(m.group(1)) for line in logs if (m := re.match(r"step (\d+): rebalance", line))]
    assert logged == migrated, logs
    assert straggler[-1]["migration_ms"] == 0 and straggler[-1]["migration_bytes"] == 0


def manifest_tables(run: Path, done: int) -> list[Placement]:
    """The placements of the checkpoint written after ``done`` steps (the layout of step ``done``)."""
    manifest = run / "checkpoints" / f"step_{done:08d}" / "manifest.json"
    stored = json.loads(manifest.read_text())["placements"]
    return [Placement.from_dict(d) for d in stored.values()]


def test_heatmaps_follow_the_stored_placement(moved_run: tuple[Path, list[str]]) -> None:
    run, _ = moved_run
    straggler = jsonl(run / "straggler.jsonl")
    config = {"model": {"moe": {"num_experts": 8}}, "parallel": {"ep": 2, "redundant_experts": 1}}
    history = placement_history(run, config, straggler, layers=2)
    assert [(s.first_step, s.last_step) for s in history.segments] == [(0, 1), (2, 3)]
    assert [rb.step for rb in history.rebalances] == [1]
    contiguous = Placement.contiguous(8, 2, 1)
    assert boundaries(contiguous) == [0.5, 3.5, 4.5]  # expert 0 and 4 sit on both ranks
    moved = False
    for seg in history.segments:
        # the table in effect during a step is the one the checkpoint before that step stored
        expected = manifest_tables(run, seg.first_step) if seg.first_step else [contiguous] * 2
        assert seg.tables is not None
        assert [p.slot_expert_RL for p in seg.tables] == [p.slot_expert_RL for p in expected]
        moved |= any(boundaries(p) != boundaries(contiguous) for p in seg.tables)
    assert moved, "no layer's rank boundaries changed: the run does not test what it should"


@pytest.fixture(scope="module")
def report_dir(moved_run: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``moe-dist report RUN --out DIR`` through the installed console script."""
    exe = shutil.which("moe-dist")
    assert exe, "the moe-dist console script is not installed (pip install -e .)"
    out = tmp_path_factory.mktemp("report")
    subprocess.run([exe, "report", str(moved_run[0]), "--out", str(out)], check=True, timeout=120)
    return out


def test_report_has_a_placement_section(report_dir: Path, moved_run: tuple[Path, list[str]]) -> None:
    md = (report_dir / "report.md").read_text()
    section = md.split("## Placement", 1)[1].split("\n## ", 1)[0]
    for version, steps in (("v0", "0–1"), ("v1", "2–3")):
        assert re.search(rf"\| {version} \| {steps} \| [\d.]+ \| stored \|", section), section
    straggler = {r["step"]: r for r in jsonl(moved_run[0] / "straggler.jsonl")}
    for step in (1,):
        r = straggler[step]
        row = f"| {step} | v{r['placement_version']} | {r['migration_ms']:.3f} | {r['migration_bytes']} |"
        assert row in section, section


CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const ok = imgs.filter((i) => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0);
  const tables = [...document.querySelectorAll("table")];
  const shown = tables.filter((t) => t.rows.length > 1 && t.offsetHeight > 0);
  document.body.setAttribute("data-check", `${imgs.length} ${ok.length} ${shown.length}`);
});
</script>"""


def test_report_html_renders_offline_in_chromium(report_dir: Path, tmp_path: Path) -> None:
    page = (report_dir / "report.html").read_text()
    md = (report_dir / "report.md").read_text()
    plots = re.findall(r"^!\[[^\]]*\]\(([^)]+)\)$", md, flags=re.M)
    tables = len(re.findall(r"^\|---", md, flags=re.M))
    assert len(plots) == 4 and tables == 6, (plots, tables)  # 6: with the measured all-to-all bytes
    # self-contained: every image is a data URI, nothing is fetched from anywhere
    assert page.count('src="data:image/png;base64,') == len(plots)
    assert not re.search(r"(src|href)=\"(?!data:)", page) and "<link" not in page
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium): the page was not rendered")
    probe = tmp_path / "probe.html"  # the page itself carries no script; the probe adds one
    probe.write_text(page.replace("</body>", CHECK + "</body>"))
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    m = re.search(r'data-check="(\d+) (\d+) (\d+)"', dom)
    assert m, f"the page did not finish loading in chromium: {dom[:300]!r}"
    assert [int(x) for x in m.groups()] == [len(plots), len(plots), tables]
