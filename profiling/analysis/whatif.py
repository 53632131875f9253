"""What-if projection of a recorded straggler trace to other expert-parallel sizes and expert placements.

    python -m profiling.analysis.whatif RUN_DIR --ep 8 64 [--placement contiguous round_robin greedy balanced]
        [--redundant K --rebalance-every 100 --allreduce-gbps 1 --a2a-gbps 1 --expert-params P]

For every target EP size R' and placement policy, every recorded step and every MoE layer l:

    counts_i  = recorded global (token, expert) count of expert i (routing.jsonl) * R' / R
    n_r       = sum of counts_i over the experts placed on rank r
    E_r       = a_{l,p} + c_{l,p} * n_r          per phase p (fwd, bwd), with a, c the least-squares fit of
                                                 E ~ a + c*n over the whole run (straggler.jsonl)
    straggler = sum over l, p of (max_r E_r - mean_r E_r)
    step      = recorded mean step ms - recorded sum_{l,p} max_r E_r + projected sum_{l,p} max_r E_r
    a2a rows  = (1 - 1/R') * sum over l, i of counts_i     (moe.dispatch pairs: the dispatch all-to-all's
                                                 cross-rank rows; bytes = rows x D x 4; none under dedup)

Both sums are averaged over steps first; the projected straggler fraction is mean straggler / projected step
(a ratio of means, as the trainer's console summary). R is the recorded number of ranks (the world size:
routing counts are summed over every rank).

Placements (N experts, N/R' per rank, chosen per MoE layer):
    contiguous   as moe_dist: rank r holds experts r*N/R' ... (r+1)*N/R' - 1
    round_robin  expert i on rank i % R'
    greedy       longest-processing-time: experts by mean load over the run (largest first) each go to the
                 least-loaded rank that still has room (ties: lowest rank). One placement for the whole run,
                 chosen on the same trace it is scored on (in-sample, so optimistic for a future run).
    balanced     (only when asked for) S = N/R' + K slots per rank with replicas, from
                 moe_dist.placement.rebalance.balanced_placement; scored with the replica rule, plus the
                 replica-sync
                 all-reduce and the amortised migration (profiling/whatif_placement.py, its own
                 assumptions).

Assumptions (the projection is a model, not a measurement):
    - weak scaling: every rank keeps the recorded number of tokens per step, so global counts scale by
      R'/R with the same expert distribution; the routing distribution does not change with R' or with
      the placement (no retraining, no router reaction);
    - fixed per-token cost: expert time is a + c*n with the recorded (layer, phase) fit, independent of R'
      (no cache or GEMM-size effects; a negative fitted slope is clipped to 0, E = mean E);
    - no network-topology effects and all-to-all transfer time is not modelled: only the expert-compute
      critical path changes; the rest of the step (attention, dense layers, all-to-all transfer, optimizer)
      is kept at its recorded value;
    - one EP group of R' ranks; data-parallel replicas of the recorded run are not modelled;
    - no capacity limit: routing.jsonl counts are taken before any capacity drop, so for a run with
      ``capacity_factor`` set the projection is of the uncapped load (a warning is logged);
    - R' must divide N: other sizes (including R' > N) are skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from profiling.analysis.report import fit_costs, load_ratio, mean
from profiling.analysis.run_dir import Run, RunDirError, load_run
from profiling.analysis.whatif_placement import ASSUMPTIONS as PLACEMENT_ASSUMPTIONS
from profiling.analysis.whatif_placement import (
    CommModel,
    balanced_placements,
    expert_params,
    project_placements,
    redundant_message,
)
from profiling.runtime.analysis import PHASES
from profiling.runtime.record import StepExtras

log = logging.getLogger("moe_dist.whatif")

PLACEMENTS = ("contiguous", "round_robin", "greedy")
SLOT_PLACEMENTS = ("balanced",)
"""Placements with redundant slots and replicas: scored by profiling.analysis.whatif_placement, not in the
default."""
ASSUMPTIONS = [
    "weak scaling: tokens per rank fixed, global expert counts scale by R'/R with the recorded distribution",
    "same routing distribution for every EP size and placement",
    "fixed per-token cost: E = a + c*n per (layer, phase) fitted over the whole run; negative c set to 0",
    "no network-topology effects; all-to-all transfer time not modelled (kept at its recorded value)",
    "one EP group of R' ranks; data-parallel replicas not modelled",
    "no capacity limit: routing counts are before any capacity drop",
    "R' must divide the number of experts; other sizes are skipped",
    "all-to-all rows (moe.dispatch pairs): a pair's source rank is any of the R' with equal chance, so"
    " 1 - 1/R' of the pairs cross; dedup sends one row per distinct (token, rank), which per-expert counts"
    " do not determine: for a model.kind hf run moe-dist a2a-bytes RUN --ep R' counts them from the model;"
    " at the recorded EP and placement the run's measured wire_bytes (straggler.jsonl) stand for them",
]
A2A_VALUE_BYTES = 4
"""fp32 rows on the wire."""


@dataclass(frozen=True)
class Cost:
    a: float
    c: float

    def __call__(self, n: float) -> float:
        return self.a + self.c * n


def cost_models(run: Run) -> dict[tuple[int, str], Cost]:
    """The whole-run fit per (layer, phase); a negative slope carries no token signal: E = mean E."""
    if not run.straggler:
        raise ValueError(f"{run.run_dir}: no straggler.jsonl records (the run needs parallel.ep > 1)")
    out = {}
    for key, fit in fit_costs(run.straggler).items():
        a, c = fit.coef()
        if c < 0:
            log.warning("layer %d %s: fitted slope %.3g ms/row < 0, using c = 0", key[0], key[1], c)
            a, c = fit.sy / fit.n, 0.0
        out[key] = Cost(a, c)
    return out


def split_message(num_experts: int, ranks: int) -> str | None:
    """None when ``num_experts`` experts can be split evenly over ``ranks`` ranks, else the skip line."""
    if ranks >= 1 and num_experts >= ranks and num_experts % ranks == 0:
        return None
    why = " (fewer experts than ranks)" if num_experts < ranks else ""
    return f"skipped: {num_experts} experts cannot be split over {ranks} ranks{why}"


def place(policy: str, mean_load: list[float], ranks: int) -> list[int]:
    """Owner rank of each expert (``len(mean_load)`` experts, an equal number per rank)."""
    N = len(mean_load)
    k = N // ranks
    if policy == "contiguous":
        return [i // k for i in range(N)]
    if policy == "round_robin":
        return [i % ranks for i in range(N)]
    if policy == "greedy":
        owner = [0] * N
        load, held = [0.0] * ranks, [0] * ranks
        for i in sorted(range(N), key=lambda i: (-mean_load[i], i)):
            r = min((r for r in range(ranks) if held[r] < k), key=lambda r: (load[r], r))
            owner[i], load[r], held[r] = r, load[r] + mean_load[i], held[r] + 1
        return owner
    raise ValueError(f"unknown placement {policy!r}; choose from {PLACEMENTS}")


def rank_loads(counts: list[float], owner: list[int], ranks: int, scale: float) -> list[float]:
    n = [0.0] * ranks
    for i, c in enumerate(counts):
        n[owner[i]] += c * scale
    return n


def common_steps(run: Run) -> list[dict]:
    """straggler records of the steps that also have routing counts."""
    recs = [r for r in run.straggler if r["step"] in run.routing]
    if not recs:
        raise ValueError(f"{run.run_dir}: no step has both straggler.jsonl and routing.jsonl records")
    return recs


def recorded(run: Run, costs: dict[tuple[int, str], Cost]) -> dict:
    """The recorded run: measured means, and the cost model applied to the recorded per-rank loads."""
    recs = common_steps(run)
    step = mean([r["step_ms"] for r in recs])
    summax = mean([sum(max(e[p]["E"]) for e in r["layers"] for p in PHASES) for r in recs])
    S = mean([sum(e[p]["straggler_ms"] for e in r["layers"] for p in PHASES) for r in recs])
    model = 0.0
    for r in recs:
        for e in r["layers"]:
            for p in PHASES:
                E = [costs[(e["layer"], p)](n) for n in e["n"]]
                model += (max(E) - mean(E)) / len(recs)
    return {
        "world": run.world,
        "ep": run.ep,
        "num_experts": run.num_experts,
        "steps": len(recs),
        "step_ms": step,
        "sum_max_E_ms": summax,
        "straggler_ms": S,
        "straggler_frac": S / step if step > 0 else 0.0,
        "model_straggler_ms": model,
        "model_straggler_frac": model / step if step > 0 else 0.0,
        "placement": recorded_placement(run.config),
        "a2a_bytes_measured": measured_a2a_bytes(recs),
    }


def measured_a2a_bytes(recs: list[dict]) -> float | None:
    """The recorded dispatch all-to-all bytes per step, all ranks and MoE layers (straggler.jsonl
    ``wire_bytes``: what the configured dispatch measured, dedup's pair lists included), mean over ``recs``;
    None for a run recorded before they were logged."""
    wires = [sum(r["wire_bytes"]) for r in recs if "wire_bytes" in r]
    return mean(wires) if len(wires) == len(recs) and wires else None


def recorded_placement(config: dict) -> str:
    """The recorded run's placement as its config names it (``parallel.placement``, redundant slots)."""
    par = config.get("parallel", {})
    name = str(par.get("placement", "contiguous"))
    k = int(par.get("redundant_experts", 0) or 0)
    return f"{name}+{k}" if k else name


def a2a_projection(run: Run, ranks: int, policy: str | None = None) -> dict:
    """Dispatch-direction all-to-all rows (and bytes when D is known) per step at EP size ``ranks``, summed
    over ranks and MoE layers, for the run's ``moe.dispatch`` (the combine sends as many back). None where the
    routing counts cannot tell: under ``dedup`` (see ASSUMPTIONS), except at the recorded EP size and
    placement, where the recorded ``wire_bytes`` are the answer (``a2a_measured``)."""
    model = run.config.get("model", {})
    dispatch = str(model.get("moe", {}).get("dispatch", "pairs"))
    if dispatch != "pairs":
        measured = None
        if ranks == run.ep and policy == recorded_placement(run.config):
            measured = measured_a2a_bytes(common_steps(run))
        return {
            "dispatch": dispatch,
            "a2a_rows": None,
            "a2a_bytes": measured,
            "a2a_measured": measured is not None,
        }
    recs = common_steps(run)
    pairs = mean([sum(map(sum, run.routing[r["step"]])) for r in recs]) * ranks / run.world
    rows = pairs * (1.0 - 1.0 / ranks)
    d = model.get("d_model") if model.get("kind", "moe_dist") == "moe_dist" else None
    return {"dispatch": dispatch, "a2a_rows": rows, "a2a_bytes": rows * d * A2A_VALUE_BYTES if d else None}


def project_one(run: Run, costs: dict[tuple[int, str], Cost], ranks: int, policy: str, base: dict) -> dict:
    recs = common_steps(run)
    scale = ranks / run.world
    layers = []
    straggler = summax = 0.0
    for li, layer in enumerate(run.layers):
        mean_load = [mean([run.routing[r["step"]][li][i] for r in recs]) for i in range(run.num_experts)]
        owner = place(policy, mean_load, ranks)
        acc = {"fwd": 0.0, "bwd": 0.0, "ratio": 0.0}
        for r in recs:
            n = rank_loads(run.routing[r["step"]][li], owner, ranks, scale)
            acc["ratio"] += load_ratio(n) / len(recs)
            for p in PHASES:
                E = [costs[(layer, p)](x) for x in n]
                acc[p] += (max(E) - mean(E)) / len(recs)
                summax += max(E) / len(recs)
        straggler += acc["fwd"] + acc["bwd"]
        layers.append(
            {
                "layer": layer,
                "fwd_straggler_ms": acc["fwd"],
                "bwd_straggler_ms": acc["bwd"],
                "load_ratio": acc["ratio"],
                "owner": owner,
            }
        )
    step = base["step_ms"] - base["sum_max_E_ms"] + summax
    return {
        "ep": ranks,
        "placement": policy,
        "skipped": None,
        "experts_per_rank": run.num_experts // ranks,
        "token_scale": scale,
        **a2a_projection(run, ranks, policy),
        "load_ratio": mean([x["load_ratio"] for x in layers]),
        "straggler_ms": straggler,
        "sum_max_E_ms": summax,
        "step_ms": step,
        "straggler_frac": straggler / step if step > 0 else 0.0,
        "layers": layers,
    }


@dataclass(frozen=True)
class SlotOptions:
    """How ``balanced`` is scored (profiling.analysis.whatif_placement)."""

    redundant: int = 0
    """K: redundant slots per rank."""
    comm: CommModel = CommModel()
    expert_params: int | None = None
    """Parameters of one routed expert; None: from the run's config (moe_dist models)."""


def project(
    run_dir: Path, ep_sizes: list[int], placements: list[str], slots: SlotOptions | None = None
) -> list[dict]:
    """One row per (EP size, placement); an EP size that does not divide the experts gives one row with
    ``skipped`` set to the message (and ``placement`` None)."""
    for p in placements:
        if p not in PLACEMENTS + SLOT_PLACEMENTS:
            raise ValueError(f"unknown placement {p!r}; choose from {PLACEMENTS + SLOT_PLACEMENTS}")
    run = load_run(Path(run_dir))
    costs = cost_models(run)
    return project_run(run, costs, recorded(run, costs), ep_sizes, placements, slots)


def project_slots(
    run: Run, costs: dict[tuple[int, str], Cost], base: dict, ranks: int, policy: str, opts: SlotOptions
) -> dict:
    msg = redundant_message(run.num_experts, ranks, opts.redundant)
    if msg is not None:
        return {"ep": ranks, "placement": policy, "skipped": msg}
    params = opts.expert_params if opts.expert_params is not None else expert_params(run.config)
    placements = balanced_placements(run, ranks, opts.redundant)
    return project_placements(run, costs, base, ranks, placements, opts.comm, params, name=policy)


def project_run(
    run: Run,
    costs: dict[tuple[int, str], Cost],
    base: dict,
    ep_sizes: list[int],
    placements: list[str],
    slots: SlotOptions | None = None,
) -> list[dict]:
    if StepExtras.from_jsonl(run.straggler[0]).capacity_padding is not None:
        log.warning(
            "capacity mode run: the projection uses the routing counts before the capacity drop (no cap), "
            "while the recorded loads are after it"
        )
    rows: list[dict] = []
    for R in ep_sizes:
        msg = split_message(run.num_experts, R)
        if msg is not None:
            rows.append({"ep": R, "placement": None, "skipped": msg})
            continue
        for p in placements:
            if p in SLOT_PLACEMENTS:
                rows.append(project_slots(run, costs, base, R, p, slots or SlotOptions()))
            else:
                rows.append(project_one(run, costs, R, p, base))
    return rows


def format_table(base: dict, rows: list[dict]) -> str:
    out = [
        f"baseline (every row is projected from it): the recorded run, world {base['world']}, "
        f"EP {base['ep']}, placement {base.get('placement', 'contiguous')}, {base['num_experts']} experts, "
        f"{base['steps']} steps; "
        f"mean step {base['step_ms']:.2f} ms, straggler {base['straggler_ms']:.2f} ms "
        f"({100 * base['straggler_frac']:.2f} %); cost model on the recorded loads: "
        f"{base['model_straggler_ms']:.2f} ms ({100 * base['model_straggler_frac']:.2f} %)"
        + (
            f"; measured dispatch all-to-all {base['a2a_bytes_measured'] / 1e6:.3f} MB per step"
            if base.get("a2a_bytes_measured") is not None
            else ""
        ),
        "step ms = recorded mean step - recorded sum of max_r E_r + projected sum of max_r E_r; "
        "x base = step ms / the baseline's mean step",
        "a2a MB = dispatch all-to-all MB per step, all ranks and layers, of the run's moe.dispatch "
        "(- where the counts cannot tell: dedup, replicas; a2a-bytes --ep counts those of an hf run; "
        "dedup at the recorded EP and placement: the measured bytes)",
        f"{'EP':>5}  {'placement':<12} {'exp/rank':>8} {'max/mean':>9} {'a2a MB':>9} {'straggler ms':>13} "
        f"{'step ms':>10} {'x base':>7} {'straggler %':>12}",
    ]
    for r in rows:
        if r["skipped"]:
            out.append(f"{r['ep']:>5}  {r['skipped']}")
            continue
        name = r["placement"] if "redundant" not in r else f"{r['placement']}+{r['redundant']}"
        a2a = f"{r['a2a_bytes'] / 1e6:.3f}" if r.get("a2a_bytes") is not None else "-"
        out.append(
            f"{r['ep']:>5}  {name:<12} {r['experts_per_rank']:>8} {r['load_ratio']:>9.3f} {a2a:>9} "
            f"{r['straggler_ms']:>13.3f} {r['step_ms']:>10.3f} {r['step_ms'] / base['step_ms']:>7.3f} "
            f"{100 * r['straggler_frac']:>12.2f}"
        )
        if "redundant" in r:
            mig = sum(x["migration_bytes"] for x in r["layers"])
            out.append(
                f"{'':>7}(step includes replica sync {r['replica_sync_ms']:.3f} ms and migration "
                f"{r['migration_ms']:.3f} ms / {r['rebalance_every']} steps = "
                f"{r['amortised_migration_ms']:.3f} ms; {mig / 1e6:.3f} MB per rebalance)"
            )
    return "\n".join(out)


EXAMPLE = "example: moe-dist whatif runs/demo --ep 8 64 --placement contiguous greedy"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EXAMPLE)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--ep", type=int, nargs="+", required=True, help="target expert-parallel sizes")
    ap.add_argument("--placement", nargs="+", default=list(PLACEMENTS), choices=PLACEMENTS + SLOT_PLACEMENTS)
    ap.add_argument("--redundant", type=int, default=0, help="balanced: redundant slots per rank (K)")
    ap.add_argument("--rebalance-every", type=int, default=CommModel.rebalance_every, help="balanced: steps")
    ap.add_argument("--allreduce-gbps", type=float, default=CommModel.allreduce_gbps, help="balanced: GB/s")
    ap.add_argument("--a2a-gbps", type=float, default=CommModel.a2a_gbps, help="balanced: GB/s per rank")
    ap.add_argument("--expert-params", type=int, default=None, help="balanced: params of one expert")
    args = ap.parse_args(argv)
    if args.rebalance_every < 1 or args.allreduce_gbps <= 0 or args.a2a_gbps <= 0:
        raise SystemExit("error: --rebalance-every must be >= 1 and the bandwidths > 0")
    slots = SlotOptions(
        args.redundant,
        CommModel(args.allreduce_gbps, args.a2a_gbps, args.rebalance_every),
        args.expert_params,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        run = load_run(args.run_dir)
    except RunDirError as e:
        raise SystemExit(f"error: {e}") from None
    costs = cost_models(run)
    base = recorded(run, costs)
    rows = project_run(run, costs, base, args.ep, args.placement, slots)
    print(format_table(base, rows))  # noqa: T201 - the table is the command's output
    path = args.run_dir / "whatif.json"
    assumptions = ASSUMPTIONS + (PLACEMENT_ASSUMPTIONS if set(args.placement) & set(SLOT_PLACEMENTS) else [])
    path.write_text(json.dumps({"recorded": base, "assumptions": assumptions, "rows": rows}, indent=1))
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
