"""The benchmark commands must not rot: a seconds-long run of each emits valid JSON. No speed asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from profiling import bench_layer, bench_overhead


def test_bench_layer_smoke(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    bench_layer.main(
        [
            "--ranks",
            "1",
            "--experts",
            "4",
            "--topk",
            "2",
            "--tokens",
            "64",
            "--d-model",
            "32",
            "--d-ff",
            "64",
            "--warmup",
            "1",
            "--iters",
            "1",
            "--out",
            str(out),
        ]
    )
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
    assert out.with_suffix(".md").read_text().startswith("| R | E | K |")


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
