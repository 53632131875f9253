"""The GPU suite's smoke mode (the same code paths on the CPU, tiny sizes), so that it cannot rot before a
GPU is lent; and its runner's promise that a failing or hung part records why and lets the next one run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from profiling.bench import gpu_suite

ROOT = Path(__file__).resolve().parents[2]

FIELDS = {
    "matmul_peak": ["tflops", "per_size"],
    "layer_oracle": ["errors", "tolerance", "tokens"],
    "ep2": ["errors", "tokens"],
    "trainer_resume": ["steps", "resumed_from", "rows", "differing_steps"],
    "fsdp_bf16": ["losses", "max_loss_rel_diff", "memory_per_rank", "resume", "activation_forward"],
    "dispatch_ep2": ["variants", "repeat_bit_equal", "overlap_bit_equal", "dedup_max_rel_err"],
    "hf_pretrained": ["load", "logits_max_rel_err", "bf16_loss"],
    "straggler": ["delays_ms", "wait_ms", "slope"],
    "host_syncs": ["sync_ops_fwd", "sync_ops_bwd", "sync_warnings_fwd", "sync_warnings_bwd"],
    "layer_bench": ["peak_tflops", "rows"],
    "trainer_bench": ["params", "tokens_per_s", "mfu", "peak_tflops", "peak_memory_gb"],
}
ENV = ["device", "torch", "cuda", "python", "seconds", "status", "passed"]


def test_smoke_suite_writes_every_part(tmp_path: Path) -> None:
    """Every part runs to status ok on the CPU and writes its JSON with the environment and its figures;
    the exact checks (oracle errors, bit-exact resume) pass; the benchmarks' figures are positive."""
    proc = subprocess.run(
        [sys.executable, "-m", "profiling.bench.gpu_suite", "--out", str(tmp_path), "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(FIELDS) == list(gpu_suite.PARTS), "a new part needs its expected fields here"
    recs = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in FIELDS}
    for name, rec in recs.items():
        assert rec["status"] == "ok", (name, rec.get("error"), rec.get("traceback"))
        missing = [k for k in ENV + FIELDS[name] if k not in rec]
        assert not missing, f"{name}.json lacks {missing}"
        assert rec["passed"] is (True if rec["checks"] else None), (name, rec.get("checks"))
    assert recs["layer_oracle"]["errors"]["fp32"]["grad_w1"] <= 1e-4
    assert recs["layer_oracle"]["errors"]["bf16"]["hidden"] <= 3e-2
    assert recs["trainer_resume"]["differing_steps"] == []
    fsdp = recs["fsdp_bf16"]  # fp32 on the CPU: the same math as engine torch, resumed under it
    assert fsdp["max_loss_rel_diff"] <= 1e-6 and fsdp["resume"]["resume_check"] == "pass", fsdp["resume"]
    assert fsdp["activation_forward"]["meter_over_estimate"] == pytest.approx(1, rel=0.25)
    assert recs["dispatch_ep2"]["overlap_bit_equal"] == {"pairs": True, "dedup": True}
    v = recs["dispatch_ep2"]["variants"]
    assert 0 < v["dedup"]["wire_rows"] <= v["pairs"]["wire_rows"] and v["pairs+overlap"]["step_ms"] > 0
    rows = recs["layer_bench"]["rows"]
    assert len(rows) == 4 and all(r["moe_ms"] > 0 and r["ratio_to_dense"] > 0 for r in rows)
    assert recs["trainer_bench"]["tokens_per_s"] > 0 and 0 < recs["trainer_bench"]["mfu"] < 1
    assert "GPU suite on cpu" in proc.stderr and "trainer_bench" in proc.stderr.split("GPU suite on")[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the full mode runs on this GPU")
def test_failing_and_hung_parts_are_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full-mode part on a machine without a GPU fails with its one-line reason in its JSON; a part past
    its timeout is killed and recorded as such; neither raises in the runner."""
    rec = gpu_suite.launch_part("layer_oracle", tmp_path, smoke=False)
    assert rec["status"] == "error" and rec["passed"] is False
    assert "no CUDA device" in rec["error"]
    monkeypatch.setattr(gpu_suite, "SMOKE_TIMEOUT_S", 0.05)
    rec = gpu_suite.launch_part("ep2", tmp_path, smoke=True)
    assert rec["status"] == "timeout" and "timeout after" in rec["error"]
    assert json.loads((tmp_path / "ep2.json").read_text())["status"] == "timeout"
