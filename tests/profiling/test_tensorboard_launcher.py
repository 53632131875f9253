"""profiling.analysis.tensorboard: on a real 2-rank gloo trace, the plugin's Distributed view counts
all-to-all.

The same traces are served twice, at once: by the launcher and by plain TensorBoard. Plain TensorBoard
shows the Distributed view with all_reduce only; the launcher adds all-to-all rows and time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from profiling.analysis.tensorboard import patch_plugin
from tests.helpers.launch import ROOT, child_env, free_port, run_ranks
from tests.profiling.profiler_trace_workers import profiled_all_to_all_worker

pytestmark = pytest.mark.timeout(180)

RUN = "moe"  # run name = the traces' directory relative to --logdir
API = "/data/plugin/pytorch_profiler"
STEPS = 3  # schedule(wait=0, warmup=1, active=2): 2 recorded steps, so 2 calls of each collective
DIM = 16  # row width in profiler_trace_workers; rank r sends 3 * (r + 1) float32 rows per step
LOAD_TIMEOUT = 90.0


def _get(base: str, route: str, **params: str) -> Any:
    url = f"{base}{API}{route}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@contextlib.contextmanager
def _server(cmd: list[str], logdir: Path, name: str) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """Run a TensorBoard command on a free port; always kill its whole process group afterwards."""
    port = free_port()
    env = child_env()
    argv = [*cmd, "--logdir", str(logdir), "--port", str(port), "--host", "127.0.0.1"]
    log = logdir / f"{name}.log"
    with open(log, "w") as out:
        # own session: the group holds TensorBoard, its data server and the plugin's parser processes
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield f"http://127.0.0.1:{port}", proc, log
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue


def _wait_loaded(base: str, proc: subprocess.Popen, log: Path, deadline: float, run: str = RUN) -> None:
    """Wait until the plugin lists ``run`` and has finished loading it (bounded by ``deadline``)."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
            runs = _get(base, "/runs")
            if run in runs["runs"] and not runs["loading"]:
                return
        time.sleep(0.25)
    pytest.fail(f"{proc.args}: run {run!r} not loaded within {LOAD_TIMEOUT}s:\n{log.read_text()[-3000:]}")


def _distributed(base: str) -> dict[str, Any]:
    """The four Distributed-view responses for RUN (views, workers and spans checked on the way)."""
    assert "Distributed" in _get(base, "/views", run=RUN)
    assert _get(base, "/workers", run=RUN, view="Distributed") == ["All"]
    spans = _get(base, "/spans", run=RUN, worker="All")
    assert spans == ["1"]  # one trace file per worker, named <host>_<rank>.<timestamp>.pt.trace.json
    q = {"run": RUN, "worker": "All", "span": spans[0]}
    return {ep: _get(base, f"/distributed/{ep}", **q) for ep in ("commops", "waittime", "overlap", "gpuinfo")}


def _rows(commops: dict[str, Any], worker: str) -> dict[str, dict[str, float]]:
    table = commops["data"][worker]
    cols = [c["name"] for c in table["columns"]]
    return {row[0]: dict(zip(cols[1:], row[1:], strict=True)) for row in table["rows"]}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Record the 2-rank trace, serve it with the launcher and with plain TensorBoard, fetch both views."""
    logdir = tmp_path_factory.mktemp("tb")
    workers = run_ranks(profiled_all_to_all_worker, 2, str(logdir / RUN), STEPS, timeout=90)
    assert len(list((logdir / RUN).glob("*.pt.trace.json"))) == 2
    cmds = {
        "patched": [sys.executable, "-m", "profiling.analysis.tensorboard"],
        "plain": [sys.executable, "-m", "tensorboard.main"],
    }
    out: dict[str, Any] = {"workers": workers}
    with contextlib.ExitStack() as stack:
        servers = {k: stack.enter_context(_server(c, logdir, k)) for k, c in cmds.items()}
        deadline = time.monotonic() + LOAD_TIMEOUT
        for k, (base, proc, log) in servers.items():
            _wait_loaded(base, proc, log, deadline)
            out[k] = _distributed(base)
    return out


def test_patch_plugin_is_idempotent_and_reaches_every_reader() -> None:
    from torch_tb_profiler.profiler import event_parser, loader, node, trace

    first = patch_plugin()
    assert first == ["gloo:all_to_all", "nccl:all_to_all"]
    process = loader.Process
    assert patch_plugin() == first and loader.Process is process  # no second wrap, no duplicates
    assert trace.GlooOpNameSet.count("gloo:all_to_all") == 1
    for mod in (event_parser, node):  # `from .trace import ...` copies: patched in place, so the same lists
        assert mod.GlooOpNameSet is trace.GlooOpNameSet and mod.NcclOpNameSet is trace.NcclOpNameSet


def test_launcher_distributed_view_counts_all_to_all_per_worker(served: dict[str, Any]) -> None:
    patched = served["patched"]
    assert sorted(patched["commops"]["data"]) == sorted(served["workers"]) and len(served["workers"]) == 2
    for rank, worker in enumerate(sorted(served["workers"])):
        rows = _rows(patched["commops"], worker)
        a2a = rows["gloo:all_to_all"]
        assert a2a["Calls"] == STEPS - 1
        # uneven splits: rank r's input is 3 * (r + 1) rows of DIM float32 per call
        assert a2a["Total Size (bytes)"] == (STEPS - 1) * 3 * (rank + 1) * DIM * 4
        assert a2a["Total Latency (us)"] > 0 and a2a["Data Transfer Time (us)"] > 0
        assert rows["gloo:all_reduce"]["Calls"] == STEPS - 1
    assert patched["gpuinfo"] is None  # CPU-only traces: no device properties, the rest of the view works


def test_plain_tensorboard_ignores_all_to_all(served: dict[str, Any]) -> None:
    plain, patched = served["plain"], served["patched"]
    for worker in served["workers"]:
        names = set(_rows(plain["commops"], worker))
        assert names == {"gloo:all_reduce"}, names  # the view exists, all-to-all is just not in it
        # all-to-all time now shows in the per-worker comm charts: wait/transfer and overlap ("all" steps)
        assert sum(patched["waittime"]["data"]["all"][worker]) > sum(plain["waittime"]["data"]["all"][worker])
        comm = [sum(v["data"]["all"][worker][1:3]) for v in (patched["overlap"], plain["overlap"])]
        assert comm[0] > comm[1], comm


def test_launcher_on_a_recorded_trainer_run(tmp_path: Path) -> None:
    """The trainer's own 2-rank traces (profile.trace=true, EP=2): the launcher's Distributed view has an
    all-to-all row for every worker."""
    from tests.training.train_workers import tiny, train_worker

    cfg = tiny(
        out_dir=str(tmp_path),
        name="run",
        parallel={"ep": 2},
        train={"steps": 4},
        profile={"trace": True, "wait": 1, "warmup": 1, "active": 2},
    )
    run_ranks(train_worker, 2, cfg, timeout=120)
    logdir = tmp_path / "run"  # its tb/ directory holds the traces, so the plugin's run is "tb"
    launcher = [sys.executable, "-m", "profiling.analysis.tensorboard"]
    with _server(launcher, logdir, "trainer") as (base, proc, log):
        _wait_loaded(base, proc, log, time.monotonic() + LOAD_TIMEOUT, run="tb")
        spans = _get(base, "/spans", run="tb", worker="All")
        commops = _get(base, "/distributed/commops", run="tb", worker="All", span=spans[0])
        console = log.read_text()
    assert len(commops["data"]) == 2
    for worker in commops["data"]:
        rows = _rows(commops, worker)
        assert rows["gloo:all_to_all"]["Calls"] > 0, rows.keys()
    assert '"GET /' not in console, console[-2000:]  # HTTP requests are not logged line by line
