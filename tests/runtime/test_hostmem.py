"""Keeping freed host memory (moe_dist/hostmem.py): through the real start-up path, in fresh processes."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moe_dist.runtime import hostmem
from tests.helpers.launch import ROOT, child_env, free_port, launch, python_cmd
from tests.training.train_workers import tiny

# where pyproject installs cmeel-mimalloc; elsewhere the mechanism falls back to glibc's mallopt
MIMALLOC_PLATFORM = sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64")
needs_mimalloc = pytest.mark.skipif(
    not MIMALLOC_PLATFORM, reason="cmeel-mimalloc is a dependency on Linux only"
)
# Filling 64 MB of memory never touched before costs at least one fault per 2 MB page (32; 16,384 with
# 4 KB pages); reused memory costs none. So "< 32" means reused and ">= 32" means fresh, whatever the
# machine's transparent huge page setting.
FRESH_64MB_MIN_FAULTS = 32


def _clean_env() -> dict[str, str]:
    return child_env(drop=("LD_PRELOAD", hostmem.MARKER))


def _probe(*args: str) -> tuple[int, dict, str]:
    """``python -m moe_dist.runtime.hostmem``: the trainer's start-up path, then the 64 MB refill probe."""
    p = subprocess.Popen(
        [sys.executable, "-m", "moe_dist.runtime.hostmem", *args],
        env=_clean_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    return p.pid, json.loads(out.strip().splitlines()[-1]), err


@needs_mimalloc
def test_retained_host_memory_is_reused() -> None:
    """Started as the trainer starts (python -m, then reexec_with_allocator): the process re-executes
    itself under mimalloc in place (same PID), and a 64 MB block filled right after an identical one was
    freed reuses its pages, while a block of never-touched memory in the same process does fault (the
    probe can see faults). glibc's mallopt held in about half of the launches only; this must hold in all."""
    pid, res, err = _probe()
    assert res["pid"] == pid, "re-executed as a new process: launchers would lose track of it"
    assert res["allocator"] == "mimalloc", err[-3000:]
    assert err.count("host allocator: mimalloc") == 1, err[-3000:]
    assert res["fresh"] >= FRESH_64MB_MIN_FAULTS, res
    assert res["refill"] < FRESH_64MB_MIN_FAULTS, res


def test_glibc_default_refaults_a_freed_64mb_block() -> None:
    """Without the mechanism: glibc maps blocks over its 32 MB maximum mmap threshold afresh and unmaps
    them on free, every time, so the refill faults like fresh memory (deterministic, unlike mallopt)."""
    _, res, err = _probe("release")
    assert res["allocator"] == "glibc" and "host allocator" not in err
    assert res["refill"] >= FRESH_64MB_MIN_FAULTS, res


@needs_mimalloc
def test_trainer_entry_point_runs_under_mimalloc(tmp_path: Path) -> None:
    """The real trainer command on one rank: it logs the allocator once and trains."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny(out_dir=str(tmp_path), train={"steps": 1, "eval_every": 1})))
    env = dict(_clean_env(), RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    p = launch(python_cmd(cfg, "name=m"), env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.count("host allocator: mimalloc") == 1, p.stderr[-3000:]
    assert json.loads((tmp_path / "m" / "summary.json").read_text())["steps"] == 1


def _no_exec(*_args: object) -> None:
    raise AssertionError("must not re-execute")


def test_no_reexec_when_off_or_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(os, "execve", _no_exec)
    monkeypatch.setattr(hostmem, "_launched_as", lambda module: True)
    monkeypatch.delenv(hostmem.MARKER, raising=False)
    called: list[bool] = []
    monkeypatch.setattr(hostmem, "retain_freed_memory", lambda: called.append(True) or True)
    hostmem.reexec_with_allocator(False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    hostmem.reexec_with_allocator(True, "nccl")
    hostmem.reexec_with_allocator(True, "auto")
    assert called == []  # nothing at all: CUDA's caching allocator keeps device memory


def test_marker_stops_a_second_reexec(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A process started with the marker but without mimalloc loaded (LD_PRELOAD failed) falls back to
    mallopt instead of re-executing forever."""
    monkeypatch.setattr(os, "execve", _no_exec)
    monkeypatch.setattr(hostmem, "_launched_as", lambda module: True)
    monkeypatch.setattr(hostmem, "allocator_in_use", lambda: "glibc")
    monkeypatch.setattr(hostmem, "allocator_env", lambda: {"LD_PRELOAD": "/x/libmimalloc.so"})
    monkeypatch.setattr(hostmem, "retain_freed_memory", lambda: True)
    monkeypatch.setenv(hostmem.MARKER, "mimalloc")
    with caplog.at_level("INFO", logger="moe_dist"):
        hostmem.reexec_with_allocator(True)
    assert "glibc with mallopt" in caplog.text and "did not load it" in caplog.text


def test_reexec_only_from_the_entry_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under pytest (or a spawned rank) __main__ is not the entry point: never replace the process."""
    monkeypatch.setattr(os, "execve", _no_exec)
    monkeypatch.delenv(hostmem.MARKER, raising=False)
    monkeypatch.setattr(hostmem, "allocator_in_use", lambda: "glibc")
    monkeypatch.setattr(hostmem, "retain_freed_memory", lambda: True)
    assert not hostmem._launched_as("moe_dist.train")
    hostmem.reexec_with_allocator(True)


@needs_mimalloc
def test_allocator_env_preloads_mimalloc_and_keeps_user_settings() -> None:
    env = hostmem.allocator_env({"LD_PRELOAD": "/opt/other.so", "MIMALLOC_PURGE_DELAY": "100"})
    assert env is not None
    first, rest = env["LD_PRELOAD"].split(":", 1)
    assert first.endswith("libmimalloc.so") and Path(first).is_file() and rest == "/opt/other.so"
    assert env["MIMALLOC_PURGE_DELAY"] == "100" and env[hostmem.MARKER] == "mimalloc"
    assert hostmem.allocator_env({})["MIMALLOC_PURGE_DELAY"] == "-1"  # type: ignore[index]
