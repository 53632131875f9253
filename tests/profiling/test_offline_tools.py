"""The offline tools' console: ``moe-dist`` lists its subcommands and each one's ``--help`` names an example;
the torchrun tools re-launch themselves; the sweep labels its reference lines and both the sweep and the
balance study log rounded lines; the study says when no method qualifies as balanced. All in-process."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from moe_dist import cli
from profiling.bench import study, sweep

LONG_FLOAT = re.compile(r"\.\d{7,}")  # the raw dicts printed 16 digits


def test_moe_dist_help_lists_every_subcommand() -> None:
    exe = shutil.which("moe-dist")
    assert exe, "the moe-dist console script is not installed (pip install -e .)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    for name in cli.COMMANDS:
        assert re.search(rf"^  {re.escape(name)} ", out, flags=re.M), (name, out)


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_each_subcommand_help_names_an_example(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert re.search(rf"example: moe-dist {re.escape(name)} \S", out), out


def test_torchrun_tools_relaunch_under_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert cli.main(["sweep", "--out", "x", "--nproc", "3", "--loads", "1", "2"]) == 0
    assert cli.main(["placement-study", "--nproc=2"]) == 0
    assert cli.main(["sweep"]) == 0
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node"]
    assert calls == [
        head + ["3", "-m", "profiling.bench.sweep", "--out", "x", "--loads", "1", "2"],
        head + ["2", "-m", "profiling.bench.placement_study"],
        head + ["4", "-m", "profiling.bench.sweep"],
    ]
    assert cli.main(["no-such-tool"]) == 2


def test_bench_layer_nproc_is_its_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench-layer spawns its own ranks: ``--nproc N`` becomes its ``--ranks N``, with no re-launch."""
    seen: list[list[str]] = []
    monkeypatch.setattr(cli, "resolve", lambda cmd: seen.append)
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: pytest.fail(f"re-launched: {cmd}"))
    cli.main(["bench-layer", "--nproc", "4", "--experts", "8"])
    cli.main(["bench-layer", "--ranks", "2"])
    assert seen == [["--ranks", "4", "--experts", "8"], ["--ranks", "2"]]


def sweep_rows() -> list[dict]:
    """Two loads measured from a first row at load 1.5 (not 1)."""
    common = {"straggler_frac": 0.1234567891, "token_explained_frac": 0.5}
    return [
        {"load": 1.5, "step_ms": 40.123456789, "straggler_ms": 2.0, "expert_ms_max_rank": 12.0, **common},
        {"load": 3.0, "step_ms": 45.0, "straggler_ms": 6.0, "expert_ms_max_rank": 18.0, **common},
    ]


def test_sweep_reference_lines_are_labelled_and_scaled_from_the_first_row(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    args = SimpleNamespace(tokens=64, steps=2)
    with caplog.at_level(logging.INFO, logger="moe_dist.sweep"):
        sweep.write_outputs(tmp_path, sweep_rows(), 2, args)
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    # expert time proportional to load: 12 ms at load 1.5 is 24 ms at load 3, so 12 ms more than the first row
    assert rows[1]["ideal_step_ms"] == pytest.approx(40.123456789 + 12.0)
    assert rows[1]["expert_only_step_ms"] == pytest.approx(40.123456789 + 6.0)
    assert rows[0]["ideal_step_ms"] == rows[0]["expert_only_step_ms"] == pytest.approx(rows[0]["step_ms"])
    assert not LONG_FLOAT.search(caplog.text), caplog.text
    line = sweep.readable(sweep_rows()[0])
    assert not LONG_FLOAT.search(line) and "40.1 ms" in line and "12%" in line, line
    assert all("ideal" not in label for label in sweep.LINE_LABELS.values())


def study_row(val_loss: float, maxvio: float, collapsed: float) -> dict:
    one = {
        "val_loss": val_loss,
        "val_bpb": 1.0,
        "maxvio_step_mean": maxvio,
        "maxvio_step_max": maxvio,
        "maxvio_batch_mean": maxvio,
        "maxvio_global": maxvio,
        "maxvio_step_per_layer": [[maxvio, maxvio]],
        "maxvio_global_per_layer": [maxvio],
        "collapsed_frac": collapsed,
        "straggler_frac": 0.0123456789,
        "alpha_L0": None,
    }
    return study.aggregate([one])


def write_run(run: Path) -> None:
    """The files the study's heatmaps read: a config and a routing trace."""
    run.mkdir()
    cfg = {"model": {"moe": {"num_experts": 4}}, "parallel": {"ep": 2}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = [json.dumps({"step": s, "tokens_per_expert": [[5, 1, 1, 1]]}) for s in range(3)]
    (run / "routing.jsonl").write_text("\n".join(lines) + "\n")


def test_study_says_when_no_method_qualifies(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = {"alpha0": study_row(2.0, 1.5, 0.25), "alpha1e-2": study_row(2.1, 0.9, 0.0)}
    for name in rows:
        write_run(tmp_path / f"{name}-s0")
    assert study.best_balanced(rows) is None
    with caplog.at_level(logging.INFO, logger="moe_dist.study"):
        study.write(tmp_path, rows)
    assert "No method qualified as balanced" in (tmp_path / "study.md").read_text()
    assert "best balanced" not in caplog.text.lower() and "No method qualified" in caplog.text
    assert not (tmp_path / "heatmaps_alpha1e-2").exists()  # only alpha0's heatmaps
    rows["alpha1e-2"] = study_row(2.1, 0.4, 0.0)
    assert study.best_balanced(rows) == "alpha1e-2"
    line = study.readable(rows["alpha0"]["per_seed"][0])
    assert "straggler_frac 0.01235" in line and not LONG_FLOAT.search(line), line


def test_export_hf_bad_input_is_one_line_through_moe_dist(tmp_path: Path) -> None:
    """``moe-dist export-hf`` on a directory without checkpoints, and into a non-empty OUT, exits 2 with one
    error line and no traceback (the handler lived only under ``python -m`` before)."""
    exe = shutil.which("moe-dist")
    assert exe, "the moe-dist console script is not installed (pip install -e .)"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("the user's file")
    for run, out, want in [
        (tmp_path / "no_run", tmp_path / "new", "CheckpointError: no checkpoint under"),
        (tmp_path / "no_run", tmp_path / "out", "ConfigError: export: "),
    ]:
        p = subprocess.run([exe, "export-hf", str(run), str(out)], capture_output=True, text=True, timeout=99)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and want in lines[0], p.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "the user's file"
