"""The benchmark commands must not rot: a seconds-long run of each emits valid JSON. No speed asserted."""

from __future__ import annotations

import json
from pathlib import Path

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
