"""How tests start processes. Ranks in-process: the package's spawner (free port, join timeouts, groups
destroyed). The trainer by subprocess: a command from ``python_cmd`` / ``torchrun_cmd`` / ``deepspeed_cmd``,
run by ``launch`` (to the end, output captured) or ``start`` (in the background, output to a file), from
the repository root in ``child_env``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from moe_dist.runtime.spawn import free_port, run_ranks
from tests.helpers import ROOT

__all__ = [
    "ROOT",
    "child_env",
    "deepspeed_cmd",
    "free_port",
    "launch",
    "python_cmd",
    "run_ranks",
    "start",
    "torchrun_cmd",
]

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def child_env(drop: Iterable[str] = (), **extra: str) -> dict[str, str]:
    """This process's environment for a child: one thread per process (2 cores, several ranks), the
    repository first on PYTHONPATH, no launcher variables inherited (a launcher sets its own; a plain
    ``python -m`` must see none), without ``drop``, plus ``extra``."""
    gone = {*LAUNCHER_VARS, *drop}
    env = {k: v for k, v in os.environ.items() if k not in gone}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**env, **extra}


def python_cmd(cfg_path, *overrides: str) -> list[str]:
    """``python -m moe_dist.train`` on ``cfg_path``: one process, no launcher."""
    return [sys.executable, "-m", "moe_dist.train", str(cfg_path), *overrides]


def torchrun_cmd(cfg_path, name: str, *extra: str, nproc: int = 2) -> list[str]:
    """``torchrun`` on a free port running the trainer entry point on ``cfg_path`` as run ``name``
    (``extra``: torchrun's own arguments)."""
    return [
        "torchrun",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
        *extra,
        "-m",
        "moe_dist.train",
        str(cfg_path),
        f"name={name}",
    ]


def deepspeed_cmd(cfg_path, name: str, *overrides: str, nproc: int = 2) -> list[str]:
    """The deepspeed launcher on a free port running the trainer entry point on ``cfg_path``."""
    return [
        "deepspeed",
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(free_port()),
        "--module",
        "moe_dist.train",
        str(cfg_path),
        f"name={name}",
        *overrides,
    ]


def launch(
    cmd: list[str],
    *,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    check: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``cmd`` to the end in ``env`` (default ``child_env()``), output captured as text; ``check``:
    assert it exited 0, showing the output's tails."""
    p = subprocess.run(
        cmd, env=child_env() if env is None else env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-5000:])
    return p


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` in the background with stdout and stderr to the file ``log`` (kept as
    ``proc.log_path``). Why a file, not a pipe: nobody reads a pipe while the job runs, and a full pipe
    blocks the job."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, env=child_env() if env is None else env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    proc.log_path = log  # type: ignore[attr-defined]
    return proc
