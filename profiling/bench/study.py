"""Balance vs quality study: the default model on the stdlib corpus under each balancing method, with the
same seed, data and step budget, launched one after another with torchrun.

    python -m profiling.bench.study --out runs/study --steps 150 --nproc 2 [--only alpha0 auto] [--overwrite]

A used ``--out`` is refused unless ``--overwrite`` (it is moved aside, nothing deleted) or ``--reuse``.

Per run it reports final val loss and bits per byte; MaxVio per step (pooled over ranks), per batch (one
rank's micro-batch) and global (counts summed over the second half of the run), per layer and averaged;
the fraction of experts that collapsed (under half the mean load in more than half of the steps); the
straggler share of step time from the profiler; and the final alpha of the auto controller. With
``--seeds S`` every method runs with train.seed 0..S-1 and the table shows the means and the val-loss
spread. It writes ``study.md``, ``study.json``, ``loss_vs_maxvio.png`` and load heatmaps for alpha=0 and
for the best balanced method (lowest val loss with no collapsed expert and global MaxVio <= 0.5); when no
method qualifies, study.md and the log say so and only alpha=0's heatmaps are drawn.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
from pathlib import Path
from statistics import fmean as mean

import torch

from moe_dist.runtime.spawn import free_port
from moe_dist.training.monitors import load_stats
from moe_dist.training.preflight import claim_out_dir
from profiling.analysis.report import plot_heatmaps
from profiling.analysis.run_dir import load_run, read_jsonl
from profiling.runtime.record import StepRecord

log = logging.getLogger("moe_dist.study")

METHODS: dict[str, list[str]] = {
    "alpha0": ["model.moe.aux_loss_coef=0"],
    "alpha1e-3": ["model.moe.aux_loss_coef=0.001"],
    "alpha1e-2": ["model.moe.aux_loss_coef=0.01"],
    "alpha1e-1": ["model.moe.aux_loss_coef=0.1"],
    "cv2": [
        "model.moe.aux_loss_coef=0",
        "model.moe.cv_importance_coef=0.01",
        "model.moe.cv_load_coef=0.01",
        "model.moe.noisy_gating=true",
    ],
    "zloss": ["model.moe.aux_loss_coef=0.01", "model.moe.z_loss_coef=0.001"],
    "bias1e-3": ["model.moe.aux_loss_coef=0", "model.moe.bias_update_rate=0.001"],
    "bias1e-2": ["model.moe.aux_loss_coef=0", "model.moe.bias_update_rate=0.01"],
    "alpha1e-2-local": ["model.moe.aux_loss_coef=0.01", "model.moe.balance_scope=local"],
    "auto": ["model.moe.aux_loss_coef=auto"],
}


def run_one(name: str, overrides: list[str], args, seed: int) -> Path:
    out = Path(args.out)
    run = f"{name}-s{seed}"
    if args.reuse and (out / run / "summary.json").exists():
        log.info("reusing %s (--reuse)", out / run)
        return out / run
    # a run left unfinished under --reuse is trained again; its remains are moved aside, not mixed in
    again = ["train.overwrite=true"] if (out / run).exists() else []
    cmd = [
        "torchrun",
        "--nproc-per-node",
        str(args.nproc),
        "--master-port",
        str(free_port()),
        "-m",
        "moe_dist.train",
        args.config,
        f"name={run}",
        f"out_dir={out}",
        f"train.steps={args.steps}",
        f"train.seed={seed}",
        f"parallel.ep={args.nproc}",
        "model.moe.z_loss_coef=0",
        "train.ckpt_every=0",
        "train.resume=false",
        *again,
        f"train.eval_every={args.steps}",
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(out / f"{run}.log", "w") as f:
        subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)
    return out / run


def analyse(run_dir: Path) -> dict:
    """One run's figures. MaxVio (max/mean - 1) is read three ways, over the second half of the run (the
    router's first steps are untrained): per step on the counts pooled over ranks ("step"), per rank on its
    own micro-batch ("batch"), and on the counts summed over the whole half ("global", Wang et al.'s
    MaxVio_global). Collapsed: under half the mean load in more than half of all steps."""
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [
        StepRecord.from_jsonl(r) for r in read_jsonl(run_dir / "metrics.jsonl") if StepRecord.is_step_row(r)
    ]
    late = steps[len(steps) // 2 :]
    layers = len(summary["mean_maxvio_per_layer"])
    step_mv = [[r.layers[i].maxvio for r in late] for i in range(layers)]
    batch_mv = [[r.layers[i].maxvio_local for r in late] for i in range(layers)]
    summed = [torch.tensor([r.tokens_per_expert[i] for r in late]).sum(0) for i in range(layers)]
    global_mv = [load_stats(counts)["maxvio"] for counts in summed]
    collapsed = 0
    for i in range(layers):
        per_expert = list(zip(*[r.tokens_per_expert[i] for r in steps], strict=True))
        for counts in per_expert:
            under = sum(
                c < 0.5 * sum(r.tokens_per_expert[i]) / len(per_expert)
                for c, r in zip(counts, steps, strict=True)
            )
            collapsed += under > len(steps) / 2
    n_experts = layers * len(steps[0].tokens_per_expert[0])
    strag = [r["straggler_frac"] for r in read_jsonl(run_dir / "straggler.jsonl")]
    alphas = [r.alphas[0] for r in steps if r.alphas]
    return {
        "val_loss": summary["final_val_loss"],
        "val_bpb": summary["final_val_bpb"],
        "maxvio_step_mean": mean([mean(m) for m in step_mv]),
        "maxvio_step_max": max(max(m) for m in step_mv),
        "maxvio_batch_mean": mean([mean(m) for m in batch_mv]),
        "maxvio_global": mean(global_mv),
        "maxvio_step_per_layer": [[round(mean(m), 3), round(max(m), 3)] for m in step_mv],
        "maxvio_global_per_layer": [round(g, 3) for g in global_mv],
        "collapsed_frac": collapsed / n_experts,
        "straggler_frac": mean(strag) if strag else None,
        "alpha_L0": alphas if alphas else None,
    }


def aggregate(per_seed: list[dict]) -> dict:
    """Mean over seeds of every scalar, with the spread (max - min) of the val loss."""
    row = {k: v for k, v in per_seed[0].items() if not isinstance(v, int | float) or isinstance(v, bool)}
    for k, v in per_seed[0].items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            row[k] = sum(r[k] for r in per_seed) / len(per_seed)
    losses = [r["val_loss"] for r in per_seed]
    row.update(seeds=len(per_seed), val_loss_spread=max(losses) - min(losses), per_seed=per_seed)
    return row


BALANCED = "no collapsed expert and global MaxVio <= 0.5"


def is_balanced(r: dict) -> bool:
    return r["collapsed_frac"] == 0 and r["maxvio_global"] <= 0.5


def best_balanced(rows: dict[str, dict]) -> str | None:
    """The balanced method (``BALANCED``) with the lowest val loss; None when no method qualifies."""
    balanced = {k: r for k, r in rows.items() if is_balanced(r)}
    return min(balanced, key=lambda k: balanced[k]["val_loss"]) if balanced else None


def verdict(best: str | None) -> str:
    if best is None:
        return f"No method qualified as balanced ({BALANCED})"
    return f"Best balanced method ({BALANCED}): {best}"


def readable(row: dict) -> str:
    """One run's scalars for the console: 4 significant digits, lists and None left out."""
    return ", ".join(
        f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)
    )


def write(out: Path, rows: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = max(r["seeds"] for r in rows.values())
    base = rows.get("alpha0")
    lines = [
        f"| method | val loss{' (spread)' if seeds > 1 else ''} | vs alpha0, same seed | bpb | "
        "MaxVio step mean / max | MaxVio batch | MaxVio global | collapsed | straggler % of step | "
        "final alpha (seed 0) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        strag = f"{100 * r['straggler_frac']:.1f}%" if r["straggler_frac"] is not None else "-"
        spread = f" ({r['val_loss_spread']:.3f})" if seeds > 1 else ""
        alpha = f"{r['alpha_L0'][-1]:.3g}" if r["alpha_L0"] else "-"
        delta = "-"
        if base is not None and name != "alpha0" and len(base["per_seed"]) == len(r["per_seed"]):
            # why paired: the seed moves every method's loss together (init and data order), by more than
            # the methods differ; the per-seed difference removes that shared part
            d = [a["val_loss"] - b["val_loss"] for a, b in zip(r["per_seed"], base["per_seed"], strict=True)]
            r["val_loss_vs_alpha0"] = d
            delta = f"{sum(d) / len(d):+.3f}" + (f" [{min(d):+.3f}, {max(d):+.3f}]" if len(d) > 1 else "")
        lines.append(
            f"| {name} | {r['val_loss']:.4f}{spread} | {delta} | {r['val_bpb']:.3f} | "
            f"{r['maxvio_step_mean']:.2f} / {r['maxvio_step_max']:.2f} | {r['maxvio_batch_mean']:.2f} | "
            f"{r['maxvio_global']:.2f} | {100 * r['collapsed_frac']:.0f}% | {strag} | {alpha} |"
        )
    (out / "study.json").write_text(json.dumps(rows, indent=1))
    n_layers = len(next(iter(rows.values()))["maxvio_global_per_layer"])
    lines += [
        "",
        "Per layer, seed 0: step MaxVio mean / max (second half of the run), then global MaxVio.",
        "",
        "| method | " + " | ".join(f"L{i}" for i in range(n_layers)) + " |",
        "|---|" + "---|" * n_layers,
    ]
    for name, r in rows.items():
        first = r["per_seed"][0]
        cells = [
            f"{m:.2f} / {x:.2f}, {g:.2f}"
            for (m, x), g in zip(
                first["maxvio_step_per_layer"], first["maxvio_global_per_layer"], strict=True
            )
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    best = best_balanced(rows)
    (out / "study.md").write_text("\n".join(lines) + f"\n\n{verdict(best)}.\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in rows.items():
        losses = [x["val_loss"] for x in r["per_seed"]]
        lo, hi = r["val_loss"] - min(losses), max(losses) - r["val_loss"]
        ax.errorbar(r["maxvio_global"], r["val_loss"], yerr=[[lo], [hi]], fmt="o", capsize=3)
        ax.annotate(name, (r["maxvio_global"], r["val_loss"]), fontsize=7)
    ax.set_xlabel("global MaxVio, second half of the run (max/mean - 1)")
    ax.set_ylabel("final val loss (nats/byte); bars: min-max over seeds")
    fig.tight_layout()
    fig.savefig(out / "loss_vs_maxvio.png", dpi=120)
    for name in dict.fromkeys(["alpha0", best]):
        if name is not None and name in rows:
            heat = out / f"heatmaps_{name}"
            heat.mkdir(exist_ok=True)
            plot_heatmaps(load_run(out / f"{name}-s0"), heat)
    log.info("%s\n%s", verdict(best), "\n".join(lines))


EXAMPLE = "example: moe-dist study --out runs/study --steps 150 --nproc 2 --only alpha0 auto"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m profiling.bench.study", description=__doc__.split("\n\n")[0], epilog=EXAMPLE
    )
    p.add_argument("--out", default="runs/study")
    p.add_argument("--config", default="configs/cpu_demo.yaml")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seeds", type=int, default=1, help="train.seed = 0 .. seeds-1 for every method")
    p.add_argument("--reuse", action="store_true", help="keep runs that already have a summary.json")
    p.add_argument("--overwrite", action="store_true", help="move a used --out aside (nothing deleted)")
    p.add_argument("--only", nargs="*", default=None, help=f"a subset of {list(METHODS)}")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    if not args.reuse:  # why: a rerun into a used --out would mix two studies' runs and tables
        refusal = claim_out_dir(out, args.overwrite)
        if refusal:
            p.error(refusal)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, overrides in METHODS.items():
        if args.only and name not in args.only:
            continue
        per_seed = []
        for seed in range(args.seeds):
            log.info("training %s, seed %d (%s)", name, seed, " ".join(overrides))
            per_seed.append(analyse(run_one(name, overrides, args, seed)))
            log.info("%s seed %d: %s", name, seed, readable(per_seed[-1]))
        rows[name] = aggregate(per_seed)
    write(out, rows)


if __name__ == "__main__":
    main()
