"""The benchmark commands must not rot: a seconds-long run of each emits valid JSON. No speed asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import re
import sys
from pathlib import Path

import pytest

from profiling.bench import layer as bench_layer
from profiling.bench import timer_overhead as bench_overhead
from tests.helpers.launch import launch


def test_bench_layer_smoke(tmp_path: Path) -> None:
    """The real command, as a user runs it: valid JSON, its ranks under the host allocator the trainer
    uses, and a console free of libkineto's profiler_start/profiler_stop markers (the peak-memory profiler
    wrote two per layer per rank, hundreds of lines in a full run)."""
    out = tmp_path / "b.json"
    cmd = [sys.executable, "-m", "profiling.bench.layer", "--ranks", "1", "--experts", "4", "--topk", "2"]
    cmd += ["--tokens", "64", "--d-model", "32", "--d-ff", "64", "--warmup", "1", "--iters", "1"]
    p = launch([*cmd, "--out", str(out)], timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    console = p.stdout + p.stderr
    assert "| R | E | K |" in console  # the output the markers were drowning is still there
    assert "USDT" not in console and "profiler_start" not in console, console[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1
    for key in (
        "dense_ms",
        "ours_dropless_ms",
        "ours_cf1.25_ms",
        "deepspeed_cf1.25_ms",
        "ours_dropless_vs_dense",
        "ours_dropless_peak_mb",
        "deepspeed_cf1.25_peak_mb",
    ):
        assert rows[0][key] > 0, key
    assert rows[0]["ours_dropless_faults"] >= 0 and rows[0]["ours_dropless_cpu_ms"] > 0
    if sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64"):
        assert rows[0]["host_allocator"] == "mimalloc"
    assert out.with_suffix(".md").read_text().startswith("| R | E | K |")


# a MoE layer's cell: "ms (×dense [IQR]) peak MB"
MOE_CELL = re.compile(r"^([\d.]+) \(([\d.]+)× \[([\d.]+), ([\d.]+)\]\) (\d+)$")


@pytest.fixture(scope="module")
def two_rank_bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], dict[str, str]]:
    """One tiny 2-rank run in bf16 with SwiGLU experts and every peer that is installed: (JSON rows,
    {column head: cell} of the table's one line)."""
    out = tmp_path_factory.mktemp("bench") / "b.json"
    cmd = [sys.executable, "-m", "profiling.bench.layer", "--ranks", "2", "--experts", "4", "--topk", "2"]
    cmd += ["--tokens", "64", "--d-model", "32", "--d-ff", "64", "--warmup", "1", "--iters", "2"]
    cmd += ["--dtype", "bf16", "--activation", "swiglu", "--out", str(out)]
    p = launch(cmd, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    head, rule, line, *rest = out.with_suffix(".md").read_text().splitlines()
    assert not rest, rest  # one configuration, one line
    cells = dict(zip(_md_cells(head), _md_cells(line), strict=True))
    return json.loads(out.read_text())["rows"], cells


def _md_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _moe_column(cells: dict[str, str], name: str, dense: str) -> str:
    return cells[f"{name} ms (×{dense} [IQR]) MB"]


def test_bench_layer_two_ranks_every_contestant(two_rank_bench) -> None:
    """Our three layers, the wire alone, DeepSpeed's and a dense FFN per expert type are all in the table,
    with positive finite figures; ours is compared with the SwiGLU dense FFN, DeepSpeed's GELU experts with
    the GELU one."""
    rows, cells = two_rank_bench
    assert len(rows) == 1 and rows[0]["dtype"] == "bf16" and rows[0]["activation"] == "swiglu"
    assert cells["dtype"] == "bf16" and cells["ours act"] == "swiglu"
    for dense in ("dense_swiglu", "dense"):
        ms, mb = re.fullmatch(r"([\d.]+) \((\d+)\)", cells[f"{dense} ms (MB)"]).groups()
        assert math.isfinite(float(ms)) and float(ms) > 0
    expected = {"ours_dropless": "dense_swiglu", "ours_cf1.25": "dense_swiglu", "ours_nocomm": "dense_swiglu"}
    expected["deepspeed_cf1.25"] = "dense"
    for name, dense in expected.items():
        m = MOE_CELL.match(_moe_column(cells, name, dense))
        assert m, (name, cells)
        assert all(math.isfinite(float(v)) and float(v) > 0 for v in m.groups()[:4]), (name, m.groups())
        assert rows[0][f"{name}_dense"] == dense
        for key in ("_ms", "_vs_dense", "_peak_mb", "_cpu_ms"):
            assert math.isfinite(rows[0][name + key]) and rows[0][name + key] > 0, name + key
    wire = MOE_CELL.match(_moe_column(cells, "wire_only", "dense_swiglu"))  # no tensors kept: 0 MB is fine
    assert wire and float(wire.group(1)) > 0 and rows[0]["wire_only_dense"] == "dense_swiglu", cells
    if importlib.util.find_spec("torchtitan") is None:
        assert not any(k.startswith("torchtitan") for k in rows[0])  # skipped, not failed


def test_bench_layer_two_ranks_torchtitan(two_rank_bench) -> None:
    """torchtitan's layer (SwiGLU experts, EP over both ranks) against the SwiGLU dense layer."""
    pytest.importorskip("torchtitan")
    rows, cells = two_rank_bench
    m = MOE_CELL.match(_moe_column(cells, "torchtitan", "dense_swiglu"))
    assert m, cells
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in m.groups()[:4]), m.groups()
    assert rows[0]["torchtitan_dense"] == "dense_swiglu"
    for key in ("_ms", "_vs_dense", "_peak_mb", "_cpu_ms"):
        assert math.isfinite(rows[0]["torchtitan" + key]) and rows[0]["torchtitan" + key] > 0, key


def test_kineto_markers_are_dropped_and_other_stderr_kept(capfd: pytest.CaptureFixture[str]) -> None:
    """Written at the C level (fd 2), as libkineto does: the markers go, an error line stays."""
    with bench_layer.without_kineto_markers():
        os.write(2, b"USDT:2026-11-23 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"ERROR: something real\n")
    err = capfd.readouterr().err
    assert "profiler_start" not in err and "ERROR: something real" in err


def test_bench_overhead_smoke(tmp_path: Path) -> None:
    out = tmp_path / "o.json"
    bench_overhead.main(
        ["--ranks", "2", "--rounds", "1", "--tokens", "64", "--steps", "2", "--out", str(out)]
    )
    res = json.loads(out.read_text())
    assert res["median_on_ms"] > 0 and res["median_off_ms"] > 0 and "overhead" in res


def test_ratios_pair_each_round_with_its_dense_step() -> None:
    """A layer's ratio to dense is the median of per-round ratios, not a ratio of medians: a slow round
    slows both layers of that round and cancels."""
    row: dict = {}
    timed = {"dense": ([10.0, 20.0, 30.0, 40.0], 1.0), "ours": ([11.0, 24.0, 30.0, 48.0], 2.0)}
    bench_layer.summarise(row, timed)
    assert row["dense_ms"] == 25.0 and row["ours_ms"] == 27.0
    # per-round ratios 1.1, 1.2, 1.0, 1.2 -> sorted 1.0, 1.1, 1.2, 1.2
    assert row["ours_vs_dense"] == pytest.approx(1.15)
    assert row["ours_vs_dense_iqr"] == pytest.approx([1.1, 1.2])
    assert row["ours_peak_mb"] == 2.0
    assert "ours_faults" not in row  # no host figures given, none reported
    bench_layer.summarise(
        row,
        {
            k: (ts, mb, [(16384.0, 40.0), (0.0, 9.0), (2.0, 10.0), (4.0, 11.0)])
            for k, (ts, mb) in timed.items()
        },
    )
    assert row["ours_faults"] == 3.0 and row["ours_cpu_ms"] == 10.5  # medians of the per-step figures
    row.update(ranks=1, experts=4, top_k=1, tokens_per_rank=8)
    table = bench_layer.markdown([row])
    assert table.splitlines()[0].count("ms (×dense") == 1, table  # one column per layer other than dense


def test_peak_memory_counts_the_step_tensors() -> None:
    """A 512 x 256 float output (0.5 MB) and its square, grads and the input grad must show up in the
    CPU peak; nothing near 16 MB is allocated."""
    import torch

    lin = torch.nn.Linear(64, 256)
    peak = bench_layer.peak_memory_mb(lin, list(lin.parameters()), torch.randn(512, 64))
    assert 1.0 <= peak < 16.0, peak
    wide = torch.nn.Linear(64, 2048)
    assert bench_layer.peak_memory_mb(wide, list(wide.parameters()), torch.randn(512, 64)) > 4 * peak


def test_peak_memory_does_not_drift_between_profiled_steps() -> None:
    """A layer that keeps a tensor past its step (DeepSpeed's MoE keeps its aux loss and counts), freed
    between two measurements: the profiler's running total keeps counting it (measured 12, 14, 16 MB for
    this module), the step's own peak does not move."""
    import torch

    class Stash(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(64, 1024)
            self.kept: torch.Tensor | None = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.lin(x)
            self.kept = y.detach().clone()
            return y

    m, x = Stash(), torch.randn(512, 64)
    peaks = []
    for _ in range(3):
        peaks.append(bench_layer.peak_memory_mb(m, list(m.parameters()), x))
        m.kept = None
    assert max(peaks) - min(peaks) < 0.05 * peaks[0], peaks
