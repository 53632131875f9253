"""Never lose a user's work (issue 21, part A): rotation that keeps what verifies, a used run directory
refused, failed and non-finite saves gathered on every rank, the shared out_dir check, durable commits,
export from the checkpoint's own config, and load errors gathered."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from moe_dist.checkpoint.files import CheckpointError, checkpoint_dirs, verify
from moe_dist.errors import ConfigError
from moe_dist.training.config import config_from_dict
from tests.helpers.launch import launch, python_cmd, run_ranks
from tests.helpers.shared_runs import snapshot
from tests.training.train_workers import tiny


def _single(cfg: dict, path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m moe_dist.train`` as one process (no launcher), on ``cfg`` written to ``path``."""
    path.write_text(yaml.safe_dump(cfg))
    return launch(python_cmd(path, *overrides), timeout=200)


def _one_process(tmp: Path, **train) -> dict:
    return tiny(out_dir=str(tmp), name="r", train={"retain_host_memory": False, **train})


@pytest.fixture(scope="module")
def finished_one(tmp_path_factory) -> Path:
    """A finished single-process run (EP 1, 6 steps) with checkpoints at steps 4 and 6."""
    tmp = tmp_path_factory.mktemp("one")
    p = _single(_one_process(tmp, steps=6, ckpt_every=2, keep_last=2), tmp / "c.yaml")
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp / "r"
    assert [d.name for d in checkpoint_dirs(run / "checkpoints")] == ["step_00000004", "step_00000006"]
    return run


def test_rotation_keeps_checkpoints_that_verify(finished_one: Path, tmp_path: Path) -> None:
    """The issue's repro: step 6's experts file has one byte flipped, summary.json is gone, and a user's
    copy ``step_00000006.bak`` sits beside the checkpoints. A relaunch with keep_last=1, ckpt_every=5,
    steps=5 resumes from 4 and saves 5. Rotation keeps 5 (it verifies) and 4 (resumed from), sets the
    corrupt 6 aside as ``step_00000006.corrupt`` (bytes kept, named in the log) instead of keeping it as
    the newest, and ignores the .bak with one warning. (Before: 5 and 4 were deleted, only the corrupt 6
    was left, and the .bak crashed the resume with ValueError.)"""
    run = tmp_path / "r"
    shutil.copytree(finished_one, run)
    ckpts = run / "checkpoints"
    bad = ckpts / "step_00000006" / "experts_ep0.pt"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    (run / "summary.json").unlink()
    shutil.copytree(ckpts / "step_00000004", ckpts / "step_00000006.bak")
    p = _single(_one_process(tmp_path, steps=5, ckpt_every=5, keep_last=1), tmp_path / "c.yaml")
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(d.name for d in ckpts.iterdir()) == [
        "step_00000004",
        "step_00000005",
        "step_00000006.bak",
        "step_00000006.corrupt",
    ]
    assert (ckpts / "step_00000006.corrupt" / "experts_ep0.pt").read_bytes() == bytes(data)
    assert verify(ckpts / "step_00000005")["step"] == 5 and verify(ckpts / "step_00000004")["step"] == 4
    assert p.stderr.count("ignoring step_00000006.bak") == 1, p.stderr[-3000:]
    assert "set aside as step_00000006.corrupt" in p.stderr
    assert "resuming from the older step 4" in p.stderr


def test_fresh_start_in_used_run_dir_is_refused(finished_one: Path, tmp_path: Path, caplog) -> None:
    """train.resume=false where a run already lives: one ConfigError line naming a new name= and
    train.overwrite=true, nothing changed; train.overwrite=true moves the old run aside whole (nothing
    deleted), so the new run's metrics never mix with the old; overwrite without resume=false is refused."""
    from moe_dist.training.preflight import preflight

    run = tmp_path / "r"
    shutil.copytree(finished_one, run)
    before = snapshot(run)
    cfg = config_from_dict(_one_process(tmp_path, resume=False))
    with pytest.raises(ConfigError) as e:
        preflight(cfg, 1, 0)
    line = str(e.value)
    assert "\n" not in line and "name=" in line and "train.overwrite=true" in line, line
    assert snapshot(run) == before
    cfg = config_from_dict(_one_process(tmp_path, resume=False, overwrite=True))
    with caplog.at_level(logging.WARNING, logger="moe_dist.train"):
        assert preflight(cfg, 1, 0) is None
    assert not run.exists()
    (moved,) = tmp_path.glob("r.old-*")
    assert snapshot(moved) == before and str(moved) in caplog.text
    with pytest.raises(ConfigError, match="needs train.resume=false"):
        config_from_dict(_one_process(tmp_path, overwrite=True))


def test_study_tools_refuse_a_used_out(tmp_path: Path, capsys) -> None:
    """The study tools' --out: a used one is refused in one line (exit 2) before anything runs or is
    written; --overwrite moves it aside, nothing deleted."""
    from moe_dist.training.preflight import claim_out_dir
    from profiling.bench import placement_study, study, sweep
    out = tmp_path / "out"
    out.mkdir()
    (out / "study.json").write_text("{}")
    for main in (study.main, sweep.main, placement_study.main):
        with pytest.raises(SystemExit) as e:
            main(["--out", str(out)] + (["--config", "/nonexistent.yaml"] if main is study.main else []))
        assert e.value.code == 2
        assert "already holds results (study.json)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert claim_out_dir(out, overwrite=True) is None and not out.exists()
    (moved,) = tmp_path.glob("out.old-*")
    assert (moved / "study.json").read_text() == "{}"


def test_commit_is_durable(tmp_path: Path, monkeypatch) -> None:
    """Every checkpoint file is fsynced before its rename and its directory after it, the step directory's
    rename is followed by an fsync of checkpoints/; summary.json and config.yaml (the trainer's text
    writes) likewise: file before the rename, directory after."""
    from moe_dist.checkpoint import files as checkpoint
    from moe_dist.checkpoint.files import atomic_write_text as _atomic_write_text  # the trainer's text writes

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        real_replace(src, dst)
        events.append(("rename", str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    root = tmp_path / "checkpoints"
    files = {"rank0.pt": {"x": torch.ones(3)}, "dense.pt": {"y": torch.zeros(2)}}
    final = checkpoint.save_checkpoint(root, 7, files, 0, lambda *x: [x[0]] if x else None, {}, 2)
    tmp = final.with_name("step_00000007.tmp")
    for name in ("rank0.pt", "dense.pt", "manifest.json"):
        i = events.index(("fsync", str(tmp / (name + ".part"))))
        assert events[i + 1 : i + 3] == [("rename", str(tmp / name)), ("fsync", str(tmp))], events[i:]
    # the commit: the step directory's rename, then its parent directory
    i = events.index(("rename", str(final)))
    assert events[i + 1] == ("fsync", str(root))
    events.clear()
    _atomic_write_text(tmp_path / "summary.json", "{}")
    assert events == [
        ("fsync", str(tmp_path / "summary.json.part")),
        ("rename", str(tmp_path / "summary.json")),
        ("fsync", str(tmp_path)),
    ]


def _failing_write(rank: int, step: int, real):
    """``real`` (``_atomic_write``), failing with ENOSPC on ``rank`` for the files of the checkpoint of
    ``step``."""

    def write(path: Path, data: bytes) -> None:
        if torch.distributed.get_rank() == rank and path.parent.name == f"step_{step:08d}.tmp":
            raise OSError(28, "No space left on device", str(path))
        real(path, data)

    return write


def _trainer(cfg: dict):
    from moe_dist.moe.parallel import ParallelLayout
    from moe_dist.training.trainer import Trainer

    c = config_from_dict(cfg)
    return Trainer(c, ParallelLayout.build(c.parallel.ep), torch.device("cpu"))


def _outcome(fn) -> tuple[str, str]:
    """("ok", "") or (error type, its one line)."""
    try:
        fn()
    except (CheckpointError, ConfigError) as e:
        return type(e).__name__, str(e)
    return "ok", ""


def _cases_worker(rank: int, world: int, root: str) -> dict:
    """Six cases on one 2-rank process group (EP 2), each a run of its own under ``root``."""
    import torch.distributed as dist

    from moe_dist.checkpoint import files as checkpoint
    from moe_dist.training import checkpointing, trainer
    def cfg(name: str, **train) -> dict:
        t = {"steps": 2, "ckpt_every": 1, "keep_last": 3, "eval_every": 1, "val_sequences": 8, **train}
        return tiny(out_dir=root, name=name, parallel={"ep": 2, "timeout_s": 20}, train=t)

    out: dict = {}
    real_write = checkpoint._atomic_write
    # 1. rank 1 cannot write the checkpoint of step 2 (disk full): stop
    checkpoint._atomic_write = _failing_write(1, 2, real_write)
    out["stop"] = _outcome(lambda: _trainer(cfg("stop")).train())
    # 2. the same at step 1 with save_failure=warn: the run goes on and saves step 2
    checkpoint._atomic_write = _failing_write(1, 1, real_write)
    out["warn"] = _outcome(lambda: _trainer(cfg("warn", save_failure="warn")).train())
    # 2b. the background writer (train.async_save) failing the same way at step 2
    checkpoint._atomic_write = _failing_write(1, 2, real_write)
    out["async"] = _outcome(lambda: _trainer(cfg("async", async_save=True)).train())
    checkpoint._atomic_write = real_write
    dist.barrier()

    # 3. an expert weight of rank 1 turns NaN just before the save of step 1
    real_save = trainer.Trainer.save

    def save(self) -> None:
        if rank == 1 and self.step == 1:
            w1 = dict(self.model.named_parameters())["blocks.1.ffn.experts.w1"]
            with torch.no_grad():
                w1[1].fill_(float("nan"))  # the slot of expert 3 (rank 1 holds experts 2 and 3)
        real_save(self)

    trainer.Trainer.save = save
    out["nan"] = _outcome(lambda: _trainer(cfg("nan", steps=1)).train())
    trainer.Trainer.save = real_save
    dist.barrier()

    # 4. resuming "stop" (newest: step 1), rank 1 cannot load its experts: every rank, the same line
    real_join = checkpointing.join_model

    def join(model, dense, experts):
        if rank == 1:
            raise KeyError("blocks.0.ffn.experts.e2.w1")
        return real_join(model, dense, experts)

    checkpointing.join_model = join
    out["load"] = _outcome(lambda: _trainer(cfg("stop", steps=3)).train())
    checkpointing.join_model = real_join
    dist.barrier()

    # 5. each rank in a directory of its own with a relative out_dir: two nodes without a shared out_dir
    os.chdir(Path(root) / f"node{rank}")
    out["shared"] = _outcome(lambda: _trainer(dict(cfg("n"), out_dir="runs")).train())
    return out


@pytest.fixture(scope="module")
def gathered(tmp_path_factory) -> tuple[Path, dict]:
    """The six cases of ``_cases_worker`` on 2 ranks: (their root, rank 0's outcomes); every rank had
    the same outcome, the same line, in every case."""
    root = tmp_path_factory.mktemp("gathered")
    for r in (0, 1):
        (root / f"node{r}").mkdir()
    res = run_ranks(_cases_worker, 2, str(root), timeout=200)
    assert res[0] == res[1], res
    return root, res[0]


def test_failed_save_stops_every_rank(gathered: tuple[Path, dict]) -> None:
    """Rank 1's disk is full at the save of step 2: every rank raises the same CheckpointError (the entry
    point prints it as one line and exits 2) naming rank 1 and the OS error; no .tmp is left and step 1
    stays the newest checkpoint."""
    from moe_dist.checkpoint.files import SaveError

    root, res = gathered
    kind, line = res["stop"]
    assert kind == "SaveError" and issubclass(SaveError, CheckpointError)
    assert "rank 1" in line and "No space left on device" in line and "\n" not in line, line
    assert sorted(p.name for p in (root / "stop" / "checkpoints").iterdir()) == ["step_00000001"]


def test_async_save_failure_is_the_same_line(gathered: tuple[Path, dict]) -> None:
    """train.async_save: rank 1's background writer fails at step 2; every rank raises the same line as the
    synchronous path, and the .tmp directory is removed (before, it was left behind)."""
    root, res = gathered
    kind, line = res["async"]
    assert kind == "SaveError" and "rank 1" in line and "No space left on device" in line, line
    assert sorted(p.name for p in (root / "async" / "checkpoints").iterdir()) == ["step_00000001"]


def test_save_failure_warn_goes_on(gathered: tuple[Path, dict]) -> None:
    """train.save_failure=warn: the failed save of step 1 is logged and the run finishes, saving step 2."""
    root, res = gathered
    assert res["warn"] == ("ok", "")
    assert sorted(p.name for p in (root / "warn" / "checkpoints").iterdir()) == ["step_00000002"]
    assert json.loads((root / "warn" / "summary.json").read_text())["steps"] == 2


def test_nonfinite_tensor_is_refused_at_save(gathered: tuple[Path, dict]) -> None:
    """A NaN expert weight on rank 1 at save: every rank refuses the checkpoint in one line naming the
    tensor; nothing is written."""
    root, res = gathered
    kind, line = res["nan"]
    assert kind == "SaveError" and "rank 1" in line and "blocks.1.ffn.experts.e3.w1" in line, line
    assert "NaN or Inf" in line
    ckpts = root / "nan" / "checkpoints"
    assert not ckpts.exists() or list(ckpts.iterdir()) == []


def test_load_error_is_gathered(gathered: tuple[Path, dict]) -> None:
    """Rank 1 cannot load its share of a checkpoint: every rank raises the same line (before, rank 0 went
    on into a collective that rank 1 never joined)."""
    _, res = gathered
    kind, line = res["load"]
    assert kind == "CheckpointError" and "rank 1 could not load" in line, line
    assert "blocks.0.ffn.experts.e2.w1" in line


def test_out_dir_must_be_shared(gathered: tuple[Path, dict]) -> None:
    """Ranks that do not see the same run directory (other filesystems, simulated with a relative out_dir
    and a working directory per rank) all stop at start with the same ConfigError saying out_dir must be
    shared; nothing is left in either directory."""
    root, res = gathered
    kind, line = res["shared"]
    assert kind == "ConfigError" and "out_dir must be on a filesystem shared by all nodes" in line, line
    assert "rank(s) [1]" in line
    assert [p for p in (root / "node0").rglob("*")] == [] and [p for p in (root / "node1").rglob("*")] == []
