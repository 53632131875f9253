"""Balance vs quality study: the default model on the stdlib corpus under each balancing method, with the
same seed, data and step budget, launched one after another with torchrun.

    python -m profiling.study --out runs/study --steps 150 --nproc 2 [--only alpha0 auto]

Per run it reports final val loss and bits per byte, mean and max global MaxVio per layer, the fraction of
experts that collapsed (under half the mean load in more than half of the steps), and the straggler share
of step time from the profiler. It writes ``study.md``, ``study.json``, ``loss_vs_maxvio.png`` and load
heatmaps for alpha=0 and for the best method (lowest val loss among runs with mean MaxVio <= 0.5).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
from pathlib import Path

from moe_dist.spawn import free_port
from profiling.report import load_run, plot_heatmaps, read_jsonl

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


def run_one(name: str, overrides: list[str], args) -> Path:
    out = Path(args.out)
    cmd = [
        "torchrun",
        "--nproc-per-node",
        str(args.nproc),
        "--master-port",
        str(free_port()),
        "-m",
        "moe_dist.train",
        args.config,
        f"name={name}",
        f"out_dir={out}",
        f"train.steps={args.steps}",
        f"parallel.ep={args.nproc}",
        "model.moe.z_loss_coef=0",
        "train.ckpt_every=0",
        "train.resume=false",
        f"train.eval_every={args.steps}",
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(out / f"{name}.log", "w") as f:
        subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)
    return out / name


def analyse(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    layers = len(summary["mean_maxvio_per_layer"])
    maxvio = [[r[f"load/L{i}/maxvio"] for r in steps] for i in range(layers)]
    collapsed = 0
    for i in range(layers):
        per_expert = list(zip(*[r["tokens_per_expert"][i] for r in steps], strict=True))
        for counts in per_expert:
            under = sum(
                c < 0.5 * sum(r["tokens_per_expert"][i]) / len(per_expert)
                for c, r in zip(counts, steps, strict=True)
            )
            collapsed += under > len(steps) / 2
    n_experts = layers * len(steps[0]["tokens_per_expert"][0])
    strag = [r["straggler_frac"] for r in read_jsonl(run_dir / "straggler.jsonl")]
    alphas = [r.get("aux/alpha/L0") for r in steps if "aux/alpha/L0" in r]
    return {
        "val_loss": summary["final_val_loss"],
        "val_bpb": summary["final_val_bpb"],
        "mean_maxvio": sum(map(sum, maxvio)) / (layers * len(steps)),
        "max_maxvio": max(max(m) for m in maxvio),
        "mean_maxvio_per_layer": [sum(m) / len(m) for m in maxvio],
        "collapsed_frac": collapsed / n_experts,
        "straggler_frac": sum(strag) / len(strag) if strag else None,
        "alpha_final_L0": alphas[-1] if alphas else None,
    }


def write(out: Path, rows: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "study.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| method | val loss | bpb | mean MaxVio | max MaxVio | collapsed experts | straggler % of step |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        strag = f"{100 * r['straggler_frac']:.1f}%" if r["straggler_frac"] is not None else "–"
        lines.append(
            f"| {name} | {r['val_loss']:.4f} | {r['val_bpb']:.3f} | {r['mean_maxvio']:.2f} | "
            f"{r['max_maxvio']:.2f} | {100 * r['collapsed_frac']:.0f}% | {strag} |"
        )
    (out / "study.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in rows.items():
        ax.scatter(r["mean_maxvio"], r["val_loss"])
        ax.annotate(name, (r["mean_maxvio"], r["val_loss"]), fontsize=7)
    ax.set_xlabel("mean global MaxVio (max/mean - 1)")
    ax.set_ylabel("final val loss (nats/byte)")
    fig.tight_layout()
    fig.savefig(out / "loss_vs_maxvio.png", dpi=120)
    balanced = {k: r for k, r in rows.items() if r["mean_maxvio"] <= 0.5} or rows
    best = min(balanced, key=lambda k: balanced[k]["val_loss"])
    for name in dict.fromkeys(["alpha0", best]):
        if name in rows:
            heat = out / f"heatmaps_{name}"
            heat.mkdir(exist_ok=True)
            plot_heatmaps(load_run(out / name), heat)
    log.info("best balanced method: %s\n%s", best, "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m profiling.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/study")
    p.add_argument("--config", default="configs/cpu_demo.yaml")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None, help=f"a subset of {list(METHODS)}")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, overrides in METHODS.items():
        if args.only and name not in args.only:
            continue
        log.info("training %s (%s)", name, " ".join(overrides))
        rows[name] = analyse(run_one(name, overrides, args))
        log.info("%s: %s", name, rows[name])
    write(out, rows)


if __name__ == "__main__":
    main()
