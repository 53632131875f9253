"""Profiler overhead: step time with the straggler timers on vs off, same layers, inputs and ranks.

    python -m profiling.bench.timer_overhead --ranks 2 --rounds 5 [--out BENCH_OVERHEAD.json]

Rounds alternate off/on so that slow drifts of the machine hit both; the overhead is the ratio of the
medians of all on-steps and all off-steps. The timers cost one perf_counter (or CUDA event) per stage
boundary and one gather of a [layers, 5] tensor per step.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

from moe_dist.runtime.spawn import run_ranks
from profiling.bench.sweep import SweepSpec, run_specs

log = logging.getLogger("moe_dist.bench")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m profiling.bench.timer_overhead")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    specs = [SweepSpec(tokens=a.tokens, steps=a.steps, timers=(i % 2 == 1)) for i in range(2 * a.rounds)]
    res = run_ranks(run_specs, a.ranks, specs, timeout=3600)[0]
    off = [ms for s, r in zip(specs, res, strict=True) if not s.timers for ms in r["step_ms"]]
    on = [ms for s, r in zip(specs, res, strict=True) if s.timers for ms in r["step_ms"]]
    out = {
        "ranks": a.ranks,
        "tokens_per_rank": a.tokens,
        "steps_each": len(on),
        "median_off_ms": statistics.median(off),
        "median_on_ms": statistics.median(on),
    }
    out["overhead"] = out["median_on_ms"] / out["median_off_ms"] - 1
    log.info(
        "timers off %.1f ms, on %.1f ms: overhead %+.2f%%",
        out["median_off_ms"],
        out["median_on_ms"],
        100 * out["overhead"],
    )
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
