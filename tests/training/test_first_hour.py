"""What a new user hits in the first hour: a second run of the same command, a changed layout or config on
resume, a corrupt checkpoint, replayed steps, no launcher, numbers in YAML, the demo's traces and console."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moe_dist.errors import ConfigError
from moe_dist.training.config import config_from_dict, load_config
from tests.helpers.launch import ROOT, launch, python_cmd, torchrun_cmd
from tests.helpers.shared_runs import snapshot
from tests.models.hf_workers import HF_TINY
from tests.training.train_workers import tiny


def _single(cfg: Path, *overrides: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m moe_dist.train`` with no launcher in the environment."""
    return launch(python_cmd(cfg, *overrides), timeout=timeout)


def _torchrun(cfg: Path, name: str, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return launch([*torchrun_cmd(cfg, name, nproc=nproc), *overrides])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_cfg(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(tiny(out_dir=str(path.parent / "runs"), **sections)))
    return path


@pytest.fixture(scope="module")
def finished_single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step single-process run, launched with no launcher at all (ep=1 runs as one process)."""
    root = tmp_path_factory.mktemp("single")
    cfg = _write_cfg(root / "c.yaml")
    p = _single(cfg)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "training as a single process" in p.stderr
    assert json.loads((root / "runs" / "tiny" / "summary.json").read_text())["steps"] == 4
    return root


@pytest.fixture(scope="module")
def finished_ep2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-rank EP=2 run under torchrun, with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("ep2")
    cfg = _write_cfg(root / "c.yaml", parallel={"ep": 2}, train={"ckpt_every": 2, "keep_last": 5})
    p = _torchrun(cfg, "tiny")
    assert p.returncode == 0, p.stderr[-3000:]
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    cfg = dst / "c.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["out_dir"] = str(dst / "runs")
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def test_numbers_in_scientific_notation_load(tmp_path: Path) -> None:
    """YAML 1.1 reads 1e-3 as a string; the config reads it as the number a user means, in a file and as an
    override."""
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 3e-4\n  min_lr: 1E-5\nmodel:\n  moe:\n    aux_loss_coef: 1e-2\n")
    cfg = load_config(path, ["optim.weight_decay=1e-1", "model.moe.z_loss_coef=2.5e-3"])
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay) == (3e-4, 1e-5, 0.1)
    assert (cfg.model.moe.aux_loss_coef, cfg.model.moe.z_loss_coef) == (1e-2, 2.5e-3)
    assert load_config(None, ["name=1e3x"]).name == "1e3x"  # not every string with an e is a number


def test_rerunning_a_finished_run_keeps_its_results(finished_single: Path, tmp_path: Path) -> None:
    cfg = _copy(finished_single, tmp_path / "w")
    run = tmp_path / "w" / "runs" / "tiny"
    before = snapshot(run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_val_loss"] is not None and max(summary["mean_maxvio_per_layer"]) > 0
    p = _single(cfg)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "already complete at step 4" in p.stderr
    assert snapshot(run) == before  # summary, metrics, checkpoints, TensorBoard: not one byte moved


def test_resume_under_another_config_names_the_keys(finished_single: Path, tmp_path: Path) -> None:
    """Keys that change the model are refused before anything is written; lr and steps pass with a
    warning that names them."""
    cfg = _copy(finished_single, tmp_path / "w")
    run = tmp_path / "w" / "runs" / "tiny"
    before = snapshot(run)
    p = _single(cfg, "model.moe.top_k=1", "train.steps=6")
    assert p.returncode == 2, p.stderr[-3000:]
    assert "model.moe.top_k: 2 -> 1" in p.stderr and "Traceback" not in p.stderr
    assert snapshot(run) == before
    p = _single(cfg, "optim.lr=1e-3", "train.steps=6")
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"changed config: optim\.lr: 0\.003 -> 0\.001; train\.steps: 4 -> 6", p.stderr)
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


def test_no_launcher_says_how_to_launch(tmp_path: Path) -> None:
    cfg = _write_cfg(tmp_path / "c.yaml", parallel={"ep": 2})
    p = _single(cfg, timeout=60)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "torchrun --nproc-per-node 2 -m moe_dist.train" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "runs").exists()


def _worker_lines(stderr: str, needle: str) -> list[str]:
    return [line for line in stderr.splitlines() if needle in line and "[rank " in line]


def test_refused_layout_change_is_one_line_per_rank_and_changes_nothing(
    finished_ep2: Path, tmp_path: Path
) -> None:
    """A format-1 checkpoint (from before per-expert files; its manifest says so) at world 2 -> 4, and EP
    2 -> 1: every rank prints one line naming the newest checkpoint and exits 2 (no peer left in a
    collective, no gloo tracebacks); the run directory is untouched. The same launch on the format-2
    checkpoint reshards it and trains on."""
    cfg = _copy(finished_ep2, tmp_path / "w")
    run = tmp_path / "w" / "runs" / "tiny"
    manifests = {p: p.read_text() for p in (run / "checkpoints").glob("step_*/manifest.json")}
    for path, text in manifests.items():
        manifest = json.loads(text)
        del manifest["format"], manifest["experts"]
        path.write_text(json.dumps(manifest))
    before = snapshot(run)
    for nproc, extra in ((4, ["train.steps=6"]), (2, ["parallel.ep=1", "train.steps=6"])):
        p = _torchrun(cfg, "tiny", *extra, nproc=nproc)
        assert p.returncode != 0
        lines = _worker_lines(p.stderr, "ConfigError")
        assert len(lines) == nproc, p.stderr[-4000:]
        assert all("step_00000004" in line and "world=2, ep=2" in line for line in lines), lines
        assert all("predates per-expert checkpoints" in line for line in lines), lines
        assert "Connection closed" not in p.stderr and "an older checkpoint" not in p.stderr
        assert len(re.findall(r"exitcode\s*: 2", p.stderr)) >= 1, p.stderr[-3000:]
        assert not re.search(r'File ".*moe_dist/', p.stderr), p.stderr[-4000:]  # no worker traceback
        assert snapshot(run) == before
    for path, text in manifests.items():
        path.write_text(text)
    p = _torchrun(cfg, "tiny", "train.steps=6", "train.micro_batch=2", nproc=4)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resharding it to world=4, ep=2" in p.stderr
    check = [r for r in _rows(run / "metrics.jsonl") if "resume_check" in r]
    assert [c["resume_check"] for c in check] == ["pass"] and check[0]["layout"] == [4, 2]


def test_unusable_checkpoint_is_one_clear_line(finished_ep2: Path, tmp_path: Path) -> None:
    """No checkpoint verifies: each rank prints the same line naming the newest bad file and what to do."""
    cfg = _copy(finished_ep2, tmp_path / "w")
    ckpts = tmp_path / "w" / "runs" / "tiny" / "checkpoints"
    for step, shard in (("step_00000004", "rank1.pt"), ("step_00000002", "rank0.pt")):
        path = ckpts / step / shard
        path.write_bytes(path.read_bytes()[:-10])
    p = _torchrun(cfg, "tiny", "train.steps=6")
    assert p.returncode != 0
    lines = _worker_lines(p.stderr, "CheckpointError")
    assert len(lines) == 2, p.stderr[-4000:]
    for line in lines:
        assert "step_00000004/rank1.pt is truncated" in line and "train.overwrite=true" in line, line
    assert not re.search(r'File ".*moe_dist/', p.stderr), p.stderr[-4000:]  # no worker traceback


def test_replayed_steps_appear_once(finished_ep2: Path, tmp_path: Path) -> None:
    """A bad shard at step 4 sends the run back to step 2; the replayed steps 2-3 are logged once in every
    JSONL file, and the summary covers the whole run."""
    cfg = _copy(finished_ep2, tmp_path / "w")
    run = tmp_path / "w" / "runs" / "tiny"
    shard = run / "checkpoints" / "step_00000004" / "rank1.pt"
    shard.write_bytes(shard.read_bytes()[:-10])
    p = _torchrun(cfg, "tiny", "train.steps=6")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from the older step 2" in p.stderr
    metrics = _rows(run / "metrics.jsonl")
    train = [r["step"] for r in metrics if "loss" in r]
    evals = [r["step"] for r in metrics if "val_loss" in r]
    assert train == list(range(6)) and evals == [0, 2, 4, 6]
    for name in ("straggler.jsonl", "routing.jsonl"):
        assert [r["step"] for r in _rows(run / name)] == list(range(6)), name
    summary = json.loads((run / "summary.json").read_text())
    want = sum(r["load/L0/maxvio"] for r in metrics if "loss" in r) / 6
    assert summary["mean_maxvio_per_layer"][0] == pytest.approx(want)


def test_demo_config_writes_a_trace_and_keeps_the_bar_clean(tmp_path: Path) -> None:
    """The demo config (shrunk) writes one trace per rank by default, and the profiler's console lines go
    above the progress bar instead of onto it."""
    shrink = [
        "model.d_model=32",
        "model.n_heads=2",
        "model.seq_len=16",
        "model.moe.d_ff=32",
        "data.kind=synthetic",
        "data.max_bytes=200000",
        "train.steps=10",
        "train.micro_batch=2",
        "train.eval_every=10",
        "train.ckpt_every=0",
        "train.log_every=2",
        f"out_dir={tmp_path}",
    ]
    p = _torchrun(ROOT / "configs" / "cpu_demo.yaml", "demo", *shrink)
    assert p.returncode == 0, p.stderr[-3000:]
    traces = list((tmp_path / "demo" / "tb").glob("*.pt.trace.json"))
    assert len(traces) == 2, traces
    assert "USDT:" not in p.stderr + p.stdout  # libkineto's start/stop markers are dropped
    profiler_lines = [s for s in re.split(r"[\r\n]", p.stderr) if "moe_dist.profile INFO: step" in s]
    assert len(profiler_lines) == 5, p.stderr[-3000:]
    for segment in profiler_lines:  # a log line glued onto the bar starts with the bar's "demo: 40%|..."
        assert re.match(r"\s*\d{4}-\d\d-\d\d ", segment), segment


def test_report_on_a_wrong_directory(tmp_path: Path) -> None:
    target = tmp_path / "no_such_run"
    p = subprocess.run(
        [sys.executable, "-m", "profiling.analysis.report", str(target)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0 and "is not a run directory" in p.stderr and "Traceback" not in p.stderr
    assert not target.exists()


def test_readme_says_how_to_get_the_cpu_wheel() -> None:
    """The install line takes the CPU wheel here only through a local mirror; the README says what a CPU-only
    user does against the public index."""
    readme = (ROOT / "README.md").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme


def test_a_replaced_key_says_what_replaced_it(tmp_path: Path) -> None:
    path = tmp_path / "old.yaml"
    path.write_text("train:\n  eval_batches: 4\n")
    for args in ((path, []), (None, ["train.eval_batches=4"])):
        with pytest.raises(ConfigError, match="replaced by train.val_sequences"):
            load_config(*args)


@pytest.mark.parametrize(
    "field,value",
    [("hidden_size", "wide"), ("num_experts", 2.5), ("num_attention_heads", None)],
)
def test_an_inline_hf_config_field_of_the_wrong_type_is_a_config_error(field: str, value: object) -> None:
    """transformers validates its config fields with its own exception types; the user gets one ConfigError
    line naming the field, from the check that runs before any process group (``check_world``)."""
    pytest.importorskip("transformers")
    hf = {**HF_TINY, field: value}
    cfg = config_from_dict(tiny(model={"kind": "hf", "hf_config": hf}))
    with pytest.raises(ConfigError, match=f"model.hf_config: .*{field}") as err:
        cfg.check_world(1)
    assert "\n" not in str(err.value)
