"""The markdown tables of ``profiling.bench.placement_study`` (measured variants, and the what-if beside
them)."""

from __future__ import annotations

MIN_PREDICTED_FRAC = 0.01
"""Below this predicted straggler share the measured / predicted ratio is not shown (a predicted perfect
balance, 0 or a rounding residue, has no meaningful ratio; the difference in points is shown instead)."""


def ratio_cell(measured: float, predicted: float) -> str:
    return "–" if predicted < MIN_PREDICTED_FRAC else f"{measured / predicted:.2f}"


def vs_cell(r: dict) -> str:
    if r.get("vs_balanced0") is None:
        return "–"
    lo, hi = r["vs_balanced0_iqr"]
    return f"{r['vs_balanced0']:.2f}× [{lo:.2f}, {hi:.2f}]"


def markdown(rows: list[dict], preds: list[dict], bw: dict, gpu_factor: float) -> str:
    """The study's two tables: measured rows, then the what-if at the measured bandwidths and at
    ``gpu_factor`` times them (``preds`` keyed by ``"measured"`` and ``f"{gpu_factor:g}x"``)."""
    lines = [
        "| max/mean load | placement | predicted max/mean | measured max/mean | step ms | "
        "×contiguous [IQR] | ×balanced+0 [IQR] | straggler ms | straggler % of step | "
        "replica-sync ms (min–max over ranks) | migration ms | migration MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["vs_contiguous_iqr"]
        lines.append(
            f"| {r['load']:.2f} | {r['placement']} | {r['predicted_load_ratio']:.2f} | "
            f"{r['measured_load_ratio']:.2f} | {r['step_ms']:.1f} | "
            f"{r['vs_contiguous']:.2f}× [{lo:.2f}, {hi:.2f}] | {vs_cell(r)} | "
            f"{r['straggler_ms']:.1f} | {100 * r['straggler_frac']:.0f}% | "
            f"{r['replica_sync_ms_min']:.1f}–{r['replica_sync_ms_max']:.1f} | {r['migration_ms']:.1f} | "
            f"{r['migration_bytes'] / 1e6:.2f} |"
        )
    tag = f"{gpu_factor:g}x"
    lines += [
        "",
        "What-if (profiling.analysis.whatif_placement) at the measured bandwidths (all-reduce "
        f"{bw['allreduce_gbps']:.3f} GB/s, all-to-all {bw['a2a_gbps']:.3f} GB/s) and at {gpu_factor:g}× "
        "both; shares are ratios of means:",
        "",
        "| max/mean load | placement | measured straggler % | predicted straggler % | measured / predicted | "
        "difference (points) | measured step ms | predicted step ms | predicted sync ms | "
        f"predicted straggler % at {gpu_factor:g}× | predicted step ms at {gpu_factor:g}× |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, p in zip(rows, preds, strict=True):
        m, g, meas = p["measured"], p[tag], r["mean_straggler_frac"]
        lines.append(
            f"| {r['load']:.2f} | {r['placement']} | {100 * r['mean_straggler_frac']:.1f}% | "
            f"{100 * m['straggler_frac']:.1f}% | {ratio_cell(meas, m['straggler_frac'])} | "
            f"{100 * (meas - m['straggler_frac']):+.1f} | "
            f"{r['mean_step_ms']:.1f} | {m['step_ms']:.1f} | {m['replica_sync_ms']:.1f} | "
            f"{100 * g['straggler_frac']:.1f}% | {g['step_ms']:.1f} |"
        )
    return "\n".join(lines) + "\n"
