"""Spawn gloo ranks in-process (tests and benchmarks): a free port, a timeout on every join, process groups
always destroyed. Training itself is launched by torchrun or the deepspeed launcher, not by this."""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_dist.runtime.net import free_port
from moe_dist.runtime.unpickle import refused_name


def _entry(
    rank: int, world: int, port: int, out_dir: str, fn: Callable, args: tuple, pg_timeout_s: float = 60.0
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # why one thread: 2 cores shared by up to 4 ranks; oversubscription wrecks progress and timings
    torch.set_num_threads(1)
    result: Any
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=pg_timeout_s))
        result = ("ok", fn(rank, world, *args))
    except BaseException as e:  # noqa: BLE001 - the parent re-raises with the rank's traceback
        result = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_ranks(
    fn: Callable,
    world: int,
    *args: Any,
    timeout: float = 240.0,
    expect_errors: bool = False,
    pg_timeout_s: float = 60.0,
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; return each rank's result.

    A rank that raises makes this raise with its traceback (unless ``expect_errors``, in which case the
    ("error", message) pairs are returned). A rank that does not finish within ``timeout`` seconds is
    killed and the call fails: tests never hang.
    """
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [
            ctx.Process(target=_entry, args=(r, world, port, out_dir, fn, args, pg_timeout_s))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
        if hung:
            raise TimeoutError(f"ranks {hung} did not finish within {timeout}s")
        results = []
        for r in range(world):
            path = os.path.join(out_dir, f"rank{r}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            try:
                # why weights_only although our own children wrote the file: a result is plain data, and
                # the parent then never runs code from a file, whoever could write the temp directory
                results.append(torch.load(path, weights_only=True))
            except pickle.UnpicklingError as e:
                raise RuntimeError(
                    f"rank {r} returned more than tensors, numbers, strings and containers: "
                    f"{refused_name(str(e))}"
                ) from None
    if expect_errors:
        return results
    for r, (status, value) in enumerate(results):
        if status != "ok":
            raise RuntimeError(f"rank {r} failed:\n{value}")
    return [value for _, value in results]
