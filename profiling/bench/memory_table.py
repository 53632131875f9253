"""The memory table of issue 25: bytes per rank that real runs measured, beside the planner's figures.

    python -m profiling.bench.memory_table --out bench/memory_table [--steps 4]
        [--engines torch deepspeed fsdp] [--models demo 64e] [--overwrite]

Each run is ``torchrun --nproc-per-node 4 -m moe_dist.train CONFIG`` for a few steps, for each model
(``configs/cpu_demo.yaml`` and the memory-bound ``configs/memory_64e.yaml``), layout (EP 2 x DP 2, EP 4) and
engine (``torch``, ``deepspeed`` ZeRO-2, and ``fsdp`` where ``ENGINES`` has it; an engine missing from
``ENGINES`` is skipped with a note). From each run's summary.json ``memory_per_rank`` (max over ranks):
parameters, gradients, AdamW moments, DeepSpeed's fp32 master partition, the activation peak (bytes saved
for backward) and the peak RSS; from its metrics.jsonl the median step time after the first step. The
planner's figures (``moe_dist.training.memory.plan``, fp32 as CPU runs are) stand beside each.
Writes memory_table.json and memory_table.md under ``--out`` (a used one is refused without --overwrite).
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
from moe_dist.training.config import load_config
from moe_dist.training.engine import ENGINES
from moe_dist.training.memory import plan
from moe_dist.training.preflight import claim_out_dir

log = logging.getLogger("moe_dist.memory_table")

MODELS = {"demo": "configs/cpu_demo.yaml", "64e": "configs/memory_64e.yaml"}
LAYOUTS = (2, 4)
"""EP sizes at world 4: EP 2 x DP 2, and EP 4."""
WORLD = 4
ENGINE_RUNS = {
    "torch": ("torch", 0, ["engine=torch"]),
    "deepspeed": ("deepspeed", 2, ["engine=deepspeed", "deepspeed.zero_stage=2"]),
    "fsdp": ("fsdp", 0, ["engine=fsdp"]),
}
"""--engines name -> (engine, ZeRO stage, overrides)."""
MIB = 2**20
EXAMPLE = "example: python -m profiling.bench.memory_table --out bench/memory_table --steps 4 --engines torch"


def launch(out: Path, name: str, config: str, ep: int, steps: int, extra: list[str]) -> Path:
    """One run of ``config`` at world 4 and EP ``ep``; its run directory."""
    overrides = [
        f"name={name}",
        f"out_dir={out}",
        f"parallel.ep={ep}",
        f"train.steps={steps}",
        f"train.eval_every={steps}",
        "train.val_sequences=8",
        "train.log_every=1",
        "train.ckpt_every=0",
        "profile.trace=false",
        *extra,
    ]
    port = str(free_port())
    cmd = ["torchrun", "--nproc-per-node", str(WORLD), "--master-port", port, "-m", "moe_dist.train"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([*cmd, config, *overrides], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"run {name} failed:\n{p.stderr[-3000:]}")
    return out / name


def measure(run: Path) -> dict:
    """memory_per_rank and the median step time (ms) after the first step."""
    memory = json.loads((run / "summary.json").read_text())["memory_per_rank"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time"] for r in rows if "step_time" in r and r["step"] >= 1]
    return memory | {"step_ms": 1e3 * statistics.median(times)}


def row(model: str, ep: int, engine: str, got: dict, want: dict) -> str:
    """One markdown row: measured (planned) MiB."""

    def pair(key: str, planned: int) -> str:
        value = got.get(key)
        measured = "n/a" if value is None else f"{value / MIB:.1f}"
        return f"{measured} ({planned / MIB:.1f})"

    zero = " ZeRO-2" if engine == "deepspeed" else ""
    activations = pair("activations_peak", want["activations_per_micro_batch"])
    return (
        f"| {model} | EP {ep} x DP {WORLD // ep} | {engine}{zero} | {pair('params', want['params'])} | "
        f"{pair('grads', want['grads'])} | {pair('optimizer', want['optimizer'])} | "
        f"{pair('master', want['master'])} | {activations} | "
        f"{got['peak_rss'] / MIB:.0f} | {got['step_ms']:.0f} |"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m profiling.bench.memory_table",
        description=__doc__.split("\n\n")[0],
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", type=Path, default=Path("bench/memory_table"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--engines", nargs="+", choices=list(ENGINE_RUNS), default=list(ENGINE_RUNS))
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--overwrite", action="store_true", help="move a used --out aside (nothing deleted)")
    args = ap.parse_args(argv)
    refusal = claim_out_dir(args.out, args.overwrite)  # why: a rerun would resume the old runs
    if refusal:
        ap.error(refusal)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out.resolve()
    notes, results = [], []
    lines = [
        "| model | layout (world 4) | engine | params | grads | AdamW moments | fp32 master | activations | "
        "peak RSS | step ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in args.engines:
        engine, zero, extra = ENGINE_RUNS[name]
        if engine not in ENGINES:
            notes.append(f"engine {engine}: not in ENGINES (moe_dist/training/engine.py) here, skipped")
            log.warning(notes[-1])
            continue
        for model, config in ((m, MODELS[m]) for m in args.models):
            for ep in LAYOUTS:
                run = launch(out, f"{model}_ep{ep}_{name}", config, ep, args.steps, extra)
                got = measure(run)
                want = plan(load_config(config, extra), WORLD, ep, engine, zero, dtype="fp32").to_json()
                results.append({"model": model, "ep": ep, "engine": name, "measured": got, "planned": want})
                lines.append(row(model, ep, engine, got, want))
                log.info(lines[-1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_table.json").write_text(json.dumps({"runs": results, "notes": notes}, indent=1))
    text = "\n".join([*lines, *(f"\n{n}" for n in notes)]) + "\n"
    (out / "memory_table.md").write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
