"""Benchmark parts of the GPU suite: the bf16 matmul peak, and the MoE layer against a dense FFN of equal
active FLOPs (EP 1, bf16 autocast, forward + backward).

FLOPs counted are the expert GEMMs' (SwiGLU: W1 is [D, 2F], W2 [F, D]): 6 P D F forward and twice that
backward, P = T K routed rows; the dense FFN is SwiGLU of width K F on all T tokens, the same count.
"""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist import MoEConfig, MoELayer
from moe_dist.moe.experts import GroupedExperts
from profiling.bench.gpu.common import device_for, matmul_tflops, peak_tflops, sync


def matmul_peak(smoke: bool, out: Path) -> dict:
    """Measured bf16 GEMM throughput: the best of two square sizes (the denominator of MFU)."""
    device = device_for(smoke)
    sizes = [128, 256] if smoke else [4096, 8192]
    per_size = {n: matmul_tflops(device, n, 2 if smoke else 10, 3 if smoke else 40) for n in sizes}
    return {"tflops": max(per_size.values()), "per_size": per_size, "checks": {}}


class DenseSwiGLU(nn.Module):
    """(silu(x W1g) * x W1u) W2 with W1 = [W1g | W1u]: the dense FFN of width ``d_ff``."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(d_model, 2 * d_ff) / d_model**0.5)
        self.w2 = nn.Parameter(torch.randn(d_ff, d_model) / d_ff**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.w1).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w2


def timed_steps(model: nn.Module, x: torch.Tensor, warmup: int, iters: int) -> float:
    """Median ms of forward + backward under bf16 autocast. Before each step (untimed) every weight is
    bumped in place, as an optimizer step would: weight casts cached per version are redone."""
    device = x.device
    times = []
    for i in range(warmup + iters):
        with torch.no_grad():
            for p in model.parameters():
                p.grad = None
                p.mul_(1.0)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        c0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = model(x)
        y = y.hidden if hasattr(y, "hidden") else y
        y.float().square().mean().backward()
        if device.type == "cuda":
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            ms = (time.perf_counter() - c0) * 1e3
        if i >= warmup:
            times.append(ms)
    return statistics.median(times)


def device_layer(cfg: MoEConfig, device: torch.device) -> MoELayer:
    """The layer moved to ``device`` uninitialised, then given uniform expert weights drawn there.

    why not the layer's own init: it draws each expert on the CPU from a generator of its own (seeded per
    expert, so that EP sizes agree), about 13 s for E=128, F=4096; a benchmark needs only the scale.
    """
    with mock.patch.object(GroupedExperts, "init_experts", lambda *a, **k: None):
        layer = MoELayer(cfg).to(device)  # the untouched CPU pages of torch.empty cost little to copy
    with torch.no_grad():
        for w in (layer.experts.w1, layer.experts.w2):
            bound = 1 / w.shape[1] ** 0.5
            w.uniform_(-bound, bound)
    return layer


def layer_bench(smoke: bool, out: Path) -> dict:
    """Every (d_ff, E, K): the MoE layer's ms, TFLOP/s and ratio to the dense FFN of equal active FLOPs."""
    device = device_for(smoke)
    peak = peak_tflops(out, device, smoke)
    if smoke:
        D, T, widths, experts, topks, warmup, iters = 64, 256, [32], [8, 16], [2, 8], 1, 2
    else:
        D, T, widths, experts, topks, warmup, iters = 2048, 16384, [1024, 4096], [8, 32, 128], [2, 8], 3, 10
    rows = []
    for Fd, E, K in itertools.product(widths, experts, topks):
        row: dict = {"d_model": D, "d_ff": Fd, "experts": E, "top_k": K, "tokens": T}
        try:
            torch.manual_seed(0)
            x = torch.randn(T, D, device=device, requires_grad=True)
            cfg = MoEConfig(num_experts=E, d_model=D, d_ff=Fd, top_k=K, activation="swiglu", residual=False)
            moe = device_layer(cfg, device)
            row["moe_ms"] = timed_steps(moe, x, warmup, iters)
            del moe
            dense = DenseSwiGLU(D, K * Fd).to(device)
            row["dense_ms"] = timed_steps(dense, x, warmup, iters)
            del dense
            flops = 18 * T * K * D * Fd
            row["moe_tflops"] = flops / (row["moe_ms"] * 1e-3) / 1e12
            row["dense_tflops"] = flops / (row["dense_ms"] * 1e-3) / 1e12
            row["ratio_to_dense"] = row["moe_ms"] / row["dense_ms"]
            row["moe_frac_of_peak"] = row["moe_tflops"] / peak
        except torch.OutOfMemoryError as e:  # one size too big must not cost the others
            row["error"] = f"OutOfMemoryError: {str(e).splitlines()[0]}"
        finally:
            sync(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    ok = [r for r in rows if "error" not in r]
    return {"peak_tflops": peak, "rows": rows, "checks": {"all_sizes_ran": len(ok) == len(rows)}}
