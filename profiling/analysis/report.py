"""Offline report of one training run's straggler profile.

    moe-dist report RUN_DIR [--out DIR]    (or python -m profiling.analysis.report; DIR defaults to RUN_DIR)

Reads ``config.yaml``, ``routing.jsonl`` and ``straggler.jsonl`` written by the trainer (and the checkpoint
manifests' placements) and writes ``report.md``, the same report as one self-contained ``report.html``
(plots embedded; it opens offline, ``profiling.analysis.report_html``), and these plots
(``profiling.analysis.report_plots``):

    load_heatmap_L{l}.png   tokens per expert over steps for MoE layer l (routing.jsonl), with the EP-rank
                            boundaries of the placement in effect (``profiling.analysis.report_placement``)
    rank_breakdown.png      per-rank time per step, averaged over steps: expert compute, wait,
                            forward all-to-all transfer time, and the rest of rank 0's step
    straggler_vs_load.png   per-step straggler time against the rank load imbalance, with a least-squares line

Definitions follow ``profiling.runtime.analysis``: W_r = max_j E_j - E_r,
straggler = max_j E_j - mean_j E_j (so the
mean wait over ranks equals the straggler time), E ~ a + c*n fitted per (layer, phase). Here the fit is
redone over the WHOLE run (the trainer's records carry a running fit), and the token-explained time is
recomputed with it: c*(n_max - n_mean) clipped to [0, straggler] per step, layer and phase.

Layer labels ``L{l}`` are the model layer indices recorded in ``straggler.jsonl``; ``routing.jsonl`` lists
the MoE layers in the same order. The loading helpers here are shared with ``profiling.analysis.whatif``.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections import Counter
from pathlib import Path

from moe_dist.moe.placement import load_ratio as rank_load_ratio
from profiling.analysis.report_html import markdown_to_html
from profiling.analysis.report_placement import md_placement, placement_history, recorded
from profiling.analysis.report_plots import plot_breakdown, plot_heatmaps, plot_straggler_vs_load
from profiling.analysis.run_dir import Run, RunDirError, load_run
from profiling.runtime.analysis import PHASES, LinearFit
from profiling.runtime.record import StepExtras

log = logging.getLogger("moe_dist.report")


def fit_costs(straggler: list[dict]) -> dict[tuple[int, str], LinearFit]:
    """E ~ a + c*n per (layer, phase) over every (step, rank) point of the run."""
    fits: dict[tuple[int, str], LinearFit] = {}
    for rec in straggler:
        for e in rec["layers"]:
            for phase in PHASES:
                fits.setdefault((e["layer"], phase), LinearFit()).add(e["n"], e[phase]["E"])
    return fits


def pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson correlation; nan when either side is constant or there are fewer than 2 points."""
    n = len(xs)
    if n < 2:
        return math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return math.nan
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / math.sqrt(sxx * syy)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def load_ratio(n: list[float]) -> float:
    """max_r n_r / mean_r n_r (1 = balanced; also 1 when nothing was counted)."""
    return rank_load_ratio(n, empty=1.0)


# --- derived numbers -----------------------------------------------------------------------------------
def explained_ms(c: float, n: list[float], straggler_ms: float) -> float:
    """Token-explained straggler time of one (step, layer, phase), as ``profiling.runtime.analysis``
    defines it."""
    return min(max(c * (max(n) - mean(n)), 0.0), straggler_ms)


def layer_summary(run: Run, li: int, fits: dict[tuple[int, str], LinearFit]) -> dict:
    layer = run.layers[li]
    entries = [rec["layers"][li] for rec in run.straggler]
    out: dict = {"layer": layer}
    ranks: Counter[int] = Counter()
    S_total = X_total = 0.0
    for phase in PHASES:
        a, c = fits[(layer, phase)].coef()
        S = [e[phase]["straggler_ms"] for e in entries]
        X = [explained_ms(c, e["n"], e[phase]["straggler_ms"]) for e in entries]
        ranks.update(e[phase]["rank"] for e in entries)
        out[phase] = {"straggler_ms": mean(S), "a": a, "c": c, "explained_ms": mean(X)}
        S_total += sum(S)
        X_total += sum(X)
    out["rank_hist"] = {r: ranks[r] for r in range(run.world)}
    out["top_rank"] = max(out["rank_hist"], key=lambda r: (out["rank_hist"][r], -r))
    out["explained_frac"] = X_total / S_total if S_total > 0 else 0.0
    skew = [s for e in entries for s in e["A_com_skew"]]
    wait = [w for e in entries for w in e["fwd"]["W"]]
    out["skew_wait_r"] = pearson(skew, wait)
    out["skew_minus_wait_ms"] = mean([s - w for s, w in zip(skew, wait, strict=True)])
    out["load_ratio"] = mean([load_ratio(e["n"]) for e in entries])
    extras = [StepExtras.from_jsonl(rec) for rec in run.straggler]
    if extras[0].capacity_padding is not None:
        out["dropped"] = mean([x.dropped[li] for x in extras])
        out["padding"] = mean([x.capacity_padding[li] for x in extras if x.capacity_padding is not None])
    return out


def rank_breakdown(run: Run) -> dict[str, list[float]]:
    """Per rank, ms per step averaged over steps: compute = sum over layers of E_fwd + E_bwd, wait = sum of
    W_fwd + W_bwd, a2a = sum of max(A_dis + A_com - W_fwd, 0) (forward only: the forward wait sits inside
    A_com; backward all-to-alls are not timed), other = rank 0's step time minus the three (>= 0)."""
    R, steps = run.world, len(run.straggler)
    acc = {k: [0.0] * R for k in ("compute", "wait", "a2a", "other")}
    for rec in run.straggler:
        per = {k: [0.0] * R for k in ("compute", "wait", "a2a")}
        for e in rec["layers"]:
            for r in range(R):
                per["compute"][r] += e["fwd"]["E"][r] + e["bwd"]["E"][r]
                per["wait"][r] += e["fwd"]["W"][r] + e["bwd"]["W"][r]
                per["a2a"][r] += max(e["A_dis"][r] + e["A_com"][r] - e["fwd"]["W"][r], 0.0)
        for r in range(R):
            for k in per:
                acc[k][r] += per[k][r] / steps
            acc["other"][r] += max(rec["step_ms"] - sum(per[k][r] for k in per), 0.0) / steps
    return acc


def step_points(run: Run) -> tuple[list[float], list[float]]:
    """Per step: x = max/mean rank load averaged over MoE layers, y = straggler ms summed over layers and
    phases."""
    xs = [mean([load_ratio(e["n"]) for e in rec["layers"]]) for rec in run.straggler]
    ys = [sum(e[p]["straggler_ms"] for e in rec["layers"] for p in PHASES) for rec in run.straggler]
    return xs, ys


def summarize(run: Run) -> dict:
    fits = fit_costs(run.straggler)
    layers = [layer_summary(run, li, fits) for li in range(len(run.layers))]
    step_ms = [rec["step_ms"] for rec in run.straggler]
    S = [sum(e[p]["straggler_ms"] for e in rec["layers"] for p in PHASES) for rec in run.straggler]
    X = [
        sum(
            explained_ms(fits[(e["layer"], p)].coef()[1], e["n"], e[p]["straggler_ms"])
            for e in rec["layers"]
            for p in PHASES
        )
        for rec in run.straggler
    ]
    per_pair: Counter[tuple[int, int]] = Counter()
    for rec in run.straggler:
        for e in rec["layers"]:
            for p in PHASES:
                per_pair[(e["layer"], e[p]["rank"])] += e[p]["straggler_ms"]
    xs, ys = step_points(run)
    line = LinearFit()
    line.add(xs, ys)
    skew = [s for rec in run.straggler for e in rec["layers"] for s in e["A_com_skew"]]
    wait = [w for rec in run.straggler for e in rec["layers"] for w in e["fwd"]["W"]]
    return {
        "steps": len(run.straggler),
        "first_step": run.straggler[0]["step"],
        "last_step": run.straggler[-1]["step"],
        "mean_step_ms": mean(step_ms),
        "straggler_ms": mean(S),
        "straggler_frac": sum(S) / sum(step_ms) if sum(step_ms) > 0 else 0.0,
        "mean_step_straggler_frac": mean([s / t for s, t in zip(S, step_ms, strict=True) if t > 0]),
        "explained_frac_online": (
            sum(r["token_explained_ms"] for r in run.straggler) / sum(S) if sum(S) > 0 else 0.0
        ),
        "explained_frac": sum(X) / sum(S) if sum(S) > 0 else 0.0,
        "balanced_step_ms": mean(step_ms) - mean(X),
        "balanced_step_ms_online": mean([r["balanced_step_ms"] for r in run.straggler]),
        "worst": max(per_pair, key=per_pair.__getitem__),
        "layers": layers,
        "breakdown": rank_breakdown(run),
        "load_fit": line.coef(),
        "load_r": pearson(xs, ys),
        "skew_wait_r": pearson(skew, wait),
        "capacity": StepExtras.from_jsonl(run.straggler[0]).capacity_padding is not None,
    }


# --- markdown ------------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def _r(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def md_summary(run: Run, s: dict) -> list[str]:
    m, t = run.config["model"], run.config["train"]
    return [
        f"# Straggler report: {run.config.get('name', run.run_dir.name)}",
        "",
        "## Run",
        "",
        f"- Steps profiled: {s['steps']} (steps {s['first_step']}–{s['last_step']})",
        f"- World: {run.world} ranks, EP = {run.ep}, experts = {run.num_experts}, "
        f"top-k = {m['moe']['top_k']}",
        f"- Micro-batch {t['micro_batch']} × seq_len {m['seq_len']} × grad_accum {t.get('grad_accum', 1)}",
        f"- Mean step time: {s['mean_step_ms']:.3f} ms",
        "",
    ]


def md_overall(s: dict) -> list[str]:
    a, c = s["load_fit"]
    return [
        "## Straggler time",
        "",
        f"- Straggler time: {s['straggler_ms']:.3f} ms per step (sum over MoE layers, fwd + bwd)",
        f"- Straggler fraction of step time: {_pct(s['straggler_frac'])} (Σ straggler / Σ step time); "
        f"mean of per-step fractions: {_pct(s['mean_step_straggler_frac'])}",
        f"- Token-explained fraction (final whole-run fit): {_pct(s['explained_frac'])}; "
        f"as logged with the trainer's running fit: {_pct(s['explained_frac_online'])}",
        f"- Balanced-step estimate (mean step − token-explained time, final fit): "
        f"{s['balanced_step_ms']:.3f} ms; as logged: {s['balanced_step_ms_online']:.3f} ms",
        f"- Worst (layer, rank) by accumulated straggler time: layer {s['worst'][0]}, rank {s['worst'][1]}",
        f"- Straggler ms vs max/mean rank load (per step; load ratio averaged over MoE layers): "
        f"{a:.3f} + {c:.3f}·x ms, Pearson r = {_r(s['load_r'])}",
        "",
    ]


def md_layers(s: dict) -> list[str]:
    cap = s["capacity"]
    head = (
        "| layer | straggler fwd ms | straggler bwd ms | straggler rank histogram | most frequent | "
        "a fwd ms | c fwd ms/row | a bwd ms | c bwd ms/row | token-explained | max/mean load |"
    )
    sep = "|---" * 11 + "|"
    if cap:
        head += " dropped/step | padding rows/step |"
        sep += "---|---|"
    rows = ["## Per layer", "", head, sep]
    for ls in s["layers"]:
        hist = ", ".join(f"r{r}: {k}" for r, k in ls["rank_hist"].items())
        f, b = ls["fwd"], ls["bwd"]
        row = (
            f"| L{ls['layer']} | {f['straggler_ms']:.3f} | {b['straggler_ms']:.3f} | {hist} | "
            f"r{ls['top_rank']} | {f['a']:.3f} | {f['c']:.4e} | {b['a']:.3f} | {b['c']:.4e} | "
            f"{_pct(ls['explained_frac'])} | {ls['load_ratio']:.3f} |"
        )
        if cap:
            row += f" {ls['dropped']:.1f} | {ls['padding']:.1f} |"
        rows.append(row)
    rows += [
        "",
        "Straggler = max_r E_r − mean_r E_r per step, averaged over steps (it equals the mean wait per "
        "rank). The histogram counts, over steps and both phases, which rank was slowest. a, c: E ≈ a + c·n "
        "fitted over every (step, rank) point of the whole run; token-explained = Σ clip(c·(n_max − n_mean), "
        "0, straggler) / Σ straggler with that final fit.",
        "",
    ]
    return rows


def md_crosscheck(s: dict) -> list[str]:
    rows = [
        "## Combine all-to-all cross-check",
        "",
        "The forward combine all-to-all on a fast rank starts early and waits for the straggler inside it, "
        "so its duration skew A_com,r − min_j A_com,j should track the forward wait W_r.",
        "",
        "| layer | Pearson r (A_com_skew, W_fwd) over (step, rank) | mean(A_com_skew − W_fwd) ms |",
        "|---|---|---|",
    ]
    for ls in s["layers"]:
        rows.append(f"| L{ls['layer']} | {_r(ls['skew_wait_r'])} | {ls['skew_minus_wait_ms']:.3f} |")
    rows += [f"| all | {_r(s['skew_wait_r'])} | |", ""]
    return rows


def md_breakdown(s: dict, image: str) -> list[str]:
    bd = s["breakdown"]
    rows = [
        "## Per-rank time breakdown",
        "",
        f"![per-rank breakdown]({image})",
        "",
        "Mean ms per step. compute = Σ_layers (E_fwd + E_bwd); wait = Σ_layers (W_fwd + W_bwd), derived as "
        "max_j E_j − E_r. The forward combine all-to-all time A_com contains the forward wait, so the "
        "all-to-all column is Σ_layers max(A_dis + A_com − W_fwd, 0): forward transfer time without the "
        "forward wait (the backward all-to-alls are not timed; the backward wait is spent inside them). "
        "other = rank 0's step time minus the three (attention, dense layers, optimizer, ...).",
        "",
        "| rank | compute ms | wait ms | all-to-all ms | other ms |",
        "|---|---|---|---|---|",
    ]
    for r in range(len(bd["compute"])):
        rows.append(
            f"| {r} | {bd['compute'][r]:.3f} | {bd['wait'][r]:.3f} | {bd['a2a'][r]:.3f} | "
            f"{bd['other'][r]:.3f} |"
        )
    return rows + [""]


def md_capacity(run: Run, s: dict) -> list[str]:
    if not s["capacity"]:
        return []
    cf = run.config["model"]["moe"].get("capacity_factor")
    return [
        "## Capacity mode",
        "",
        f"capacity_factor = {cf}. Tokens over an expert's capacity are dropped, which caps each rank's load: "
        "the imbalance then costs dropped tokens (and, with fixed-size padded buffers, padded rows of wasted "
        "compute) rather than wait. The per-layer table therefore reports the (token, expert) pairs dropped "
        "per step and the rows a fixed-capacity buffer would carry beyond the kept tokens, per step.",
        "",
    ]


def wire_summary(run: Run) -> dict | None:
    """The measured dispatch all-to-all per step (straggler.jsonl ``wire_rows`` / ``wire_bytes``: rows and
    bytes every rank sent to other ranks, summed over ranks), mean over the profiled steps, per MoE layer;
    None for a run recorded before they were logged."""
    wires = [w for w in (StepExtras.from_jsonl(rec).wire for rec in run.straggler) if w is not None]
    if not wires:
        return None
    n = len(run.layers)
    rows = [mean([float(w.rows[li]) for w in wires]) for li in range(n)]
    nbytes = [mean([float(w.bytes[li]) for w in wires]) for li in range(n)]
    model = run.config.get("model", {})
    if model.get("kind", "moe_dist") == "moe_dist":
        dispatch = str(model.get("moe", {}).get("dispatch", "pairs"))
    else:  # an HF block's default depends on its K (moe_dist.models.hf.DEDUP_FROM_TOP_K)
        dispatch = str(model.get("hf_moe", {}).get("dispatch", "the HF default"))
    return {
        "dispatch": dispatch,
        "steps": len(wires),
        "rows": rows,
        "bytes": nbytes,
        "total_bytes": sum(nbytes),
    }


def md_wire(run: Run) -> list[str]:
    w = wire_summary(run)
    if w is None:
        return []
    out = [
        "## All-to-all bytes (measured)",
        "",
        f"Dispatch all-to-all of `moe.dispatch: {w['dispatch']}` per step, summed over ranks (what each rank "
        f"sent to other ranks; the combine sends the rows back, the backward both again), mean over "
        f"{w['steps']} steps: {w['total_bytes'] / 1e6:.3f} MB in all MoE layers.",
        "",
        "| layer | wire rows/step | wire MB/step |",
        "|---|---|---|",
    ]
    for layer, r, b in zip(run.layers, w["rows"], w["bytes"], strict=True):
        out.append(f"| L{layer} | {r:.1f} | {b / 1e6:.3f} |")
    return out + [""]


def make_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write report.md, report.html (self-contained) and the plots into ``out`` (default ``run_dir``);
    return report.md's path."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir
    run = load_run(run_dir)  # a wrong directory fails before anything is created
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    history = placement_history(run_dir, run.config, run.straggler, len(run.layers))
    heatmaps = plot_heatmaps(run, out, history) if run.routing else []
    if not run.straggler:
        lines += [
            f"# Straggler report: {run_dir.name}",
            "",
            "No straggler.jsonl records (EP = 1 or profile off).",
            "",
        ]
    else:
        s = summarize(run)
        lines += md_summary(run, s) + md_overall(s) + md_layers(s) + md_capacity(run, s) + md_wire(run)
        lines += md_crosscheck(s) + md_breakdown(s, plot_breakdown(s, out))
        lines += [
            "## Straggler vs load",
            "",
            f"![straggler vs load]({plot_straggler_vs_load(*step_points(run), s, out)})",
            "",
        ]
    if recorded(run.straggler):
        lines += md_placement(history)
    if heatmaps:
        lines += ["## Expert load over steps", ""] + [f"![{h}]({h})" for h in heatmaps] + [""]
    path = out / "report.md"
    _write_atomic(path, "\n".join(lines))
    title = lines[0].lstrip("# ")
    _write_atomic(out / "report.html", markdown_to_html(lines, out, title))
    log.info("wrote %s and report.html (%d plots)", path, len(heatmaps) + (2 if run.straggler else 0))
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


EXAMPLE = "example: moe-dist report runs/demo   (or: python -m profiling.analysis.report runs/demo)"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EXAMPLE)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: the run directory)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        make_report(args.run_dir, args.out)
    except RunDirError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
