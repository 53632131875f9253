"""Shared pieces of the GPU suite: the device, sizes (full or smoke), timing, the matmul peak, the oracle.

Timing: CUDA events on a GPU (perf_counter plus a synchronize elsewhere), ``warmup`` untimed calls, then
the median of ``iters`` timed calls.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[3]
"""The checkout: profiling/bench/gpu/ sits three levels under it, next to tests/."""


def device_for(smoke: bool) -> torch.device:
    """The GPU in a full run (one is required); the CPU in a smoke run."""
    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: the full suite needs a GPU (use --smoke on a CPU)")
    return torch.device("cuda", 0)


def env_info() -> dict:
    """Device name and the torch and CUDA versions, for every part's JSON."""
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def matmul_tflops(device: torch.device, n: int, warmup: int, iters: int) -> float:
    """Measured bf16 [n, n] @ [n, n] throughput in TFLOP/s (2 n^3 flops a product)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, device, warmup, iters)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def peak_tflops(out: Path, device: torch.device, smoke: bool) -> float:
    """The matmul_peak part's figure when it ran in this output directory, else measured here."""
    path = out / "matmul_peak.json"
    if path.exists():
        rec = json.loads(path.read_text())
        if rec.get("status") == "ok":
            return float(rec["tflops"])
    return matmul_tflops(device, 256 if smoke else 8192, 2 if smoke else 10, 3 if smoke else 30)


def oracle_module() -> ModuleType:
    """The project's fp64 oracle (tests/helpers/oracle.py), from the checkout this suite runs from.

    why not a copy: the oracle is written from the seed formulas and checked by the CI suite; a second
    copy here could drift from it unnoticed.
    """
    if not (ROOT / "tests" / "helpers" / "oracle.py").exists():
        raise RuntimeError(
            f"the correctness parts need the source checkout's tests/ (not found under {ROOT})"
        )
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import tests.helpers.oracle as oracle

    return oracle


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64 on the CPU."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))
