"""Trainer runs under each expert placement, taking turns: contiguous, balanced, balanced with 1 and 2
redundant slots per rank (issue #14, the "Zipf corpus with alpha = 0" row).

    python -m profiling.bench.placement_runs --out bench/placement_runs [--rounds 2 --steps 60 --every 10]

Each run is ``torchrun --nproc-per-node 4 -m moe_dist.train configs/cpu_demo.yaml`` at EP 4 on the synthetic
Zipf corpus with every balancing loss off (alpha = 0, no z-loss), so the router is free to crowd experts.
Variants run one after another within each round (round-robin), so slow drifts of a shared machine hit
them alike. The table reports, over the steps after the first rebalance: step ms, straggler ms and share
(the profiler's straggler.jsonl), replica gradient-sync ms, and the migration ms/MB of the rebalance steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
from pathlib import Path

from moe_dist.runtime.net import free_port
from moe_dist.training.preflight import claim_out_dir

log = logging.getLogger("moe_dist.placement_runs")

VARIANTS = {
    "contiguous": [],
    "balanced+0": ["parallel.placement=balanced"],
    "balanced+1": ["parallel.placement=balanced", "parallel.redundant_experts=1"],
    "balanced+2": ["parallel.placement=balanced", "parallel.redundant_experts=2"],
}


def launch(out: Path, name: str, steps: int, every: int, extra: list[str]) -> None:
    overrides = [
        f"name={name}",
        f"out_dir={out}",
        "parallel.ep=4",
        "data.kind=synthetic",
        "model.moe.aux_loss_coef=0",
        "model.moe.z_loss_coef=0",
        "model.n_layers=2",
        f"train.steps={steps}",
        f"train.eval_every={steps}",
        f"train.ckpt_every={steps}",
        "profile.trace=false",
        *extra,
    ]
    if "parallel.placement=balanced" in extra:
        overrides.append(f"parallel.rebalance_every={every}")
    cmd = ["torchrun", "--nproc-per-node", "4", "--master-port", str(free_port()), "-m", "moe_dist.train"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([*cmd, "configs/cpu_demo.yaml", *overrides], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"run {name} failed:\n{p.stderr[-3000:]}")


def summarize(run: Path, first_step: int) -> dict[str, float]:
    rows = [json.loads(line) for line in (run / "straggler.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] >= first_step]
    mean = lambda key: statistics.fmean(float(r.get(key, 0.0)) for r in rows)  # noqa: E731
    moves = [r for r in rows if r.get("migration_bytes", 0) > 0]
    return {
        "step_ms": mean("step_ms"),
        "straggler_ms": mean("straggler_ms"),
        "straggler_share": mean("straggler_ms") / mean("step_ms"),
        "replica_sync_ms": mean("replica_sync_ms"),
        "migration_ms": statistics.fmean(r["migration_ms"] for r in moves) if moves else 0.0,
        "migration_mb": statistics.fmean(r["migration_bytes"] for r in moves) / 1e6 if moves else 0.0,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/placement_runs"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10, help="parallel.rebalance_every of the balanced runs")
    ap.add_argument("--overwrite", action="store_true", help="move a used --out aside (nothing deleted)")
    args = ap.parse_args(argv)
    refusal = claim_out_dir(args.out, args.overwrite)  # why: a rerun would resume the old runs' checkpoints
    if refusal:
        ap.error(refusal)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for rnd in range(args.rounds):
        for variant, extra in VARIANTS.items():
            name = f"{variant}_r{rnd}"
            launch(args.out.resolve(), name, args.steps, args.every, extra)
            results[variant].append(summarize(args.out / name, args.every + 1))
            log.info("round %d %s: %s", rnd, variant, results[variant][-1])
    base = [r["step_ms"] for r in results["contiguous"]]
    lines = [
        "| placement | step ms | ×contiguous (per round) | straggler ms | straggler % of step | "
        "replica-sync ms | migration ms | migration MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, runs in results.items():
        avg = {k: statistics.fmean(r[k] for r in runs) for k in runs[0]}
        ratios = ", ".join(f"{r['step_ms'] / b:.2f}" for r, b in zip(runs, base, strict=True))
        lines.append(
            f"| {variant} | {avg['step_ms']:.1f} | {ratios} | {avg['straggler_ms']:.1f} | "
            f"{100 * avg['straggler_share']:.0f}% | {avg['replica_sync_ms']:.1f} | "
            f"{avg['migration_ms']:.1f} | {avg['migration_mb']:.1f} |"
        )
    (args.out / "placement_runs.json").write_text(json.dumps(results, indent=1))
    (args.out / "placement_runs.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
