"""Rank-side body that records a real profiler trace (run under tests.helpers.launch.run_ranks)."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist


def profiled_all_to_all_worker(rank: int, world: int, logdir: str, steps: int = 3) -> str:
    """Profile ``steps`` steps of matmul, uneven ``all_to_all_single`` and ``all_reduce``; return worker name.

    Writes ``<logdir>/<host>_<rank>.<ts>.pt.trace.json`` through ``tensorboard_trace_handler``; the trace
    carries ``distributedInfo`` because the gloo process group is initialized.
    """
    torch.manual_seed(rank)
    dim = 16
    # uneven splits: rank r sends (r + 1) * (j + 1) rows to rank j, so no two (src, dst) pairs match
    in_splits = [(rank + 1) * (j + 1) for j in range(world)]
    out_splits = [(j + 1) * (rank + 1) for j in range(world)]
    w = torch.randn(dim, dim)
    worker = f"{socket.gethostname()}_{rank}"
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=steps - 1)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU],
        schedule=schedule,
        on_trace_ready=torch.profiler.tensorboard_trace_handler(logdir, worker_name=worker),
        record_shapes=True,
    ) as prof:
        for _ in range(steps):
            x = torch.randn(sum(in_splits), dim)
            for _ in range(4):
                x = torch.tanh(x @ w)
            out = torch.empty(sum(out_splits), dim)
            dist.all_to_all_single(out, x, output_split_sizes=out_splits, input_split_sizes=in_splits)
            total = out.sum().reshape(1)
            dist.all_reduce(total)
            prof.step()
    return worker
