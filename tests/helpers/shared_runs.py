"""Runs that several test files share, each made once per session (the fixtures are in tests/conftest.py).

A ``deepspeed`` launch costs ~20 s of CI on 2 cores, of which training is under a second, and a 2-rank
spawn ~8 s, so tests that only need "a finished EP=2 run with checkpoints" share one instead of each
training its own. A test never writes into a shared run: it copies it with ``SharedRun.copy`` (optionally
cut back to an earlier checkpoint) and changes the copy. Every copy, and the end of the session, checks
that the shared run is byte for byte as it was written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.helpers.launch import child_env, deepspeed_cmd, launch
from tests.training.train_workers import tiny

SHARED_STEPS = 6  # a checkpoint after every step, all kept: tests cut a copy back to step 2 or 3
RESUMED_FROM = 3  # the step the shared DeepSpeed resume starts from


def ep2_config(out_dir: Path, name: str = "a", **sections) -> dict:
    """The shared runs' config: EP=2 on 2 ranks, 6 steps, a checkpoint after every step, all kept
    (``sections`` as in ``tiny``)."""
    train = {"steps": SHARED_STEPS, "ckpt_every": 1, "keep_last": SHARED_STEPS + 4}
    train.update(sections.pop("train", {}))
    return tiny(out_dir=str(out_dir), name=name, parallel={"ep": 2}, train=train, **sections)


def write_ds_config(out_dir: Path, **train) -> Path:
    """``ep2_config`` with engine=deepspeed and ZeRO-2 (``train`` keys replaced), as ``out_dir/cfg.yaml``.
    test_deepspeed_launch_matches_torch_engine runs the torch engine and ZeRO 0/1 on this file too,
    overriding only ``engine`` or ``deepspeed.zero_stage``."""
    cfg = ep2_config(out_dir, engine="deepspeed", deepspeed={"zero_stage": 2}, train=train)
    path = out_dir / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snapshot(run: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``run``: size, mtime (ns) and sha256."""
    return {
        str(p.relative_to(run)): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


def cut_back(run: Path, step: int) -> None:
    """Drop every checkpoint after ``step`` (as if the job had stopped after writing it)."""
    ckpts = run / "checkpoints"
    for d in ckpts.iterdir():
        if d.is_dir() and int(d.name.split("_")[1]) > step:
            shutil.rmtree(d)


@dataclass(frozen=True)
class SharedRun:
    """A finished run that tests read and copy, never change."""

    path: Path
    """The run directory (``out_dir/name``)."""
    before: dict
    """``snapshot(path)`` taken right after the run finished."""
    stderr: str = ""
    """The launch's stderr (launched runs only)."""

    def check_unchanged(self) -> None:
        now = snapshot(self.path)
        changed = sorted(k for k in set(now) | set(self.before) if now.get(k) != self.before.get(k))
        assert not changed, f"a test changed the shared run {self.path}: {changed}"

    def copy(self, dst: Path, until: int | None = None) -> Path:
        """A copy of the run at ``dst`` (cut back to the checkpoint of step ``until`` if given)."""
        self.check_unchanged()
        shutil.copytree(self.path, dst)
        if until is not None:
            cut_back(dst, until)
        return dst


@dataclass(frozen=True)
class AuditedRun(SharedRun):
    """A shared run launched with ``AUDIT`` installed."""

    loads: tuple[str, ...] = ()
    """One ``PID weights_only=...`` line per torch.load call, in every process of the launch."""


def torch_run(root: Path) -> SharedRun:
    """The shared torch-engine run ``root/a`` (``ep2_config``), trained in-process on 2 spawned ranks."""
    from tests.helpers.launch import run_ranks
    from tests.training.train_workers import train_worker

    run_ranks(train_worker, 2, ep2_config(root))
    return SharedRun(root / "a", snapshot(root / "a"))


# Loaded first by every Python process of a launch (sitecustomize): log each torch.load's weights_only.
AUDIT = """
import os, torch
_load = torch.load
def _audited(*args, **kwargs):
    with open(os.environ["LOAD_AUDIT"], "a") as f:
        f.write(f"{os.getpid()} weights_only={kwargs.get('weights_only')!r}\\n")
    return _load(*args, **kwargs)
torch.load = _audited
"""


def launch_deepspeed(cfg: Path, name: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return launch(deepspeed_cmd(cfg, name), env=child_env(**(env or {})), timeout=400)


def shm_buffers_left(p: subprocess.CompletedProcess) -> list[str]:
    """DeepSpeed CPU all-reduce buffers in /dev/shm that carry launch ``p``'s master port (each rank
    unlinks its own at exit; before that fix every launch left 66 MB per rank there)."""
    port = p.args[p.args.index("--master_port") + 1]
    return sorted(f.name for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def ds_run(root: Path) -> SharedRun:
    """The shared DeepSpeed run ``root/d2`` (``write_ds_config``); the launch must succeed."""
    p = launch_deepspeed(write_ds_config(root), "d2")
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-5000:])
    assert shm_buffers_left(p) == []
    return SharedRun(root / "d2", snapshot(root / "d2"), p.stderr)


def ds_resumed(run: SharedRun, root: Path) -> AuditedRun:
    """A copy of ``run`` cut back to step RESUMED_FROM, its metrics.jsonl emptied, resumed to the end by
    the deepspeed launcher with every torch.load of every process logged to ``root/loads.txt``."""
    cfg = write_ds_config(root)
    (run.copy(root / "b", until=RESUMED_FROM) / "metrics.jsonl").write_text("")
    audit_dir = root / "audit"
    audit_dir.mkdir()
    (audit_dir / "sitecustomize.py").write_text(AUDIT)
    pythonpath = os.pathsep.join([str(audit_dir), child_env()["PYTHONPATH"]])
    p = launch_deepspeed(cfg, "b", {"PYTHONPATH": pythonpath, "LOAD_AUDIT": str(root / "loads.txt")})
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-5000:])
    loads = tuple((root / "loads.txt").read_text().splitlines())
    return AuditedRun(root / "b", snapshot(root / "b"), p.stderr, loads)
