"""Model start-up time per rank: how long building the model (with its expert init) takes on each rank.

    python -m profiling.bench.model_init configs/gpu_8x_nccl.yaml --ep 1 2 8 [model.d_model=256 ...]

For each EP size, ``ep`` gloo ranks are spawned and build the model **one at a time** (a barrier between
turns), so that each rank's time is its own work, not its share of a CPU the other ranks are using too.
Prints one line per EP size: the slowest and the mean rank's build time.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.distributed as dist

from moe_dist.models.transformer import MoETransformer
from moe_dist.moe.parallel import ParallelLayout
from moe_dist.runtime.spawn import run_ranks
from moe_dist.training.config import load_config

log = logging.getLogger("moe_dist.bench")


def _build_worker(rank: int, world: int, path: str, overrides: list[str]) -> float:
    cfg = load_config(path, [*overrides, f"parallel.ep={world}"])
    layout = ParallelLayout.build(world)
    took = 0.0
    for turn in range(world):
        if turn == rank:  # why one at a time: the CPU time of one rank alone, without its peers' contention
            torch.manual_seed(cfg.train.seed)
            t0 = time.perf_counter()
            model = MoETransformer(cfg.model, layout.ep_group, layout.balance_group)
            took = time.perf_counter() - t0
            del model
        dist.barrier()
    return took


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--ep", type=int, nargs="+", default=[1, 2, 8])
    args = p.parse_args()
    for ep in args.ep:
        times = run_ranks(_build_worker, ep, args.config, args.overrides, timeout=1800)
        log.info(
            "ep=%d: build %.2f s (slowest rank), %.2f s (mean over %d ranks)",
            ep,
            max(times),
            sum(times) / len(times),
            ep,
        )


if __name__ == "__main__":
    main()
