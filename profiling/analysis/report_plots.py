"""The report's plots (matplotlib, Agg backend): expert-load heatmaps with the EP-rank boundaries of the
placement in effect, the per-rank time breakdown and straggler time against load imbalance."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from profiling.analysis.report_placement import PlacementHistory, boundaries, placement_history


class Run(Protocol):
    """What the heatmaps read of ``profiling.analysis.report.Run`` (a protocol, so that this module does
    not import the report back: no import circle)."""

    run_dir: Path
    config: dict[str, Any]
    straggler: list[dict]
    layers: list
    routing: dict[int, list]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmaps(run: Run, out: Path, history: PlacementHistory | None = None) -> list[str]:
    """One heatmap per MoE layer: tokens per logical expert over steps. Dashed lines: the EP-rank boundaries
    of the placement in effect at each step (between neighbouring experts held by different ranks), drawn
    per placement version; solid vertical lines: the rebalances. A version whose slot tables no checkpoint
    stored gets no boundaries, and the title says so."""
    plt = _pyplot()
    if history is None:
        history = placement_history(run.run_dir, run.config, run.straggler, len(run.layers))
    steps = sorted(run.routing)
    names = []
    for li, layer in enumerate(run.layers):
        grid = [[run.routing[s][li][i] for s in steps] for i in range(len(run.routing[steps[0]][li]))]
        fig, ax = plt.subplots(figsize=(max(6.0, min(14.0, 0.12 * len(steps) + 4)), 3.5))
        img = ax.imshow(
            grid,
            aspect="auto",
            origin="lower",
            interpolation="nearest",
            cmap="viridis",
            extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(grid) - 0.5),
        )
        fig.colorbar(img, ax=ax, label="(token, expert) pairs per step")
        shown, missing = [], []
        segments = history.segments or []
        if not segments:  # no profiler records: the config's placement over the whole heatmap
            from profiling.analysis.report_placement import Segment, initial_tables

            segments = [Segment(0, steps[0], steps[-1], initial_tables(run.config, len(run.layers)))]
        for seg in segments:
            lo = steps[0] - 0.5 if seg is segments[0] else seg.first_step - 0.5
            hi = steps[-1] + 0.5 if seg is segments[-1] else seg.last_step + 0.5
            if seg.tables is None or seg.tables[li].num_experts != len(grid):
                missing.append(seg.version)
                continue
            shown.append(seg.version)
            ys = boundaries(seg.tables[li])
            if ys:
                ax.hlines(ys, lo, hi, colors="white", linestyles="--", linewidth=0.8)
        for rb in history.rebalances:
            ax.axvline(rb.step + 0.5, color="red", linewidth=1.0)
        title = f"expert load, L{layer}"
        if len(segments) > 1 or segments[0].version:
            title += ", placement " + ", ".join(f"v{v}" for v in shown)
        if missing:
            title += " (not stored: " + ", ".join(f"v{v}" for v in missing) + ")"
        ylabel = "expert (dashed: EP rank boundaries)"
        if history.rebalances:
            ylabel = "expert (dashed: rank boundaries;\nred: rebalance)"
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        name = f"load_heatmap_L{layer}.png"
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        names.append(name)
    return names


def plot_breakdown(summary: dict, out: Path) -> str:
    plt = _pyplot()
    bd = summary["breakdown"]
    ranks = list(range(len(bd["compute"])))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(ranks) + 3), 4))
    bottom = [0.0] * len(ranks)
    parts = [
        ("compute", "expert compute (E fwd+bwd)", "tab:blue", None),
        ("wait", "wait (W fwd+bwd)", "tab:red", None),
        ("a2a", "all-to-all fwd, without wait", "tab:green", None),
        ("other", "rest of rank 0's step", "lightgrey", "//"),
    ]
    for key, label, colour, hatch in parts:
        ax.bar(ranks, bd[key], bottom=bottom, label=label, color=colour, hatch=hatch)
        bottom = [b + v for b, v in zip(bottom, bd[key], strict=True)]
    ax.set(xlabel="rank", ylabel="ms per step (mean over steps)", title="per-rank time breakdown")
    ax.set_xticks(ranks)
    ax.legend(fontsize=8)
    fig.tight_layout()
    name = "rank_breakdown.png"
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name


def plot_straggler_vs_load(xs: list[float], ys: list[float], summary: dict, out: Path) -> str:
    plt = _pyplot()
    a, c = summary["load_fit"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(xs, ys, s=14, label="steps")
    lo, hi = min(xs), max(xs)
    ax.plot([lo, hi], [a + c * lo, a + c * hi], color="tab:red", label=f"fit: {a:.2f} + {c:.2f}·x ms")
    ax.set(
        xlabel="max/mean rank load (rows), mean over MoE layers",
        ylabel="straggler ms per step (sum over layers, fwd+bwd)",
        title="straggler time vs rank load imbalance",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    name = "straggler_vs_load.png"
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name
