"""Expert placement and replication under a forced routing skew (#14): when does a replica pay for its sync?

    torchrun --nproc-per-node 4 -m profiling.bench.placement_study --out runs/pstudy [--loads 1 1.5 2 3]
        [--redundant 0 1 2] [--hot-experts 1 --top-k 1] [--tokens 2048] [--steps 10]

Shape legend: R EP ranks (the world), N logical experts (N/R own per rank), L = N/R + ``redundant`` slots per
rank, M MoE layers, K top-k.

Routing is profiling.bench.sweep's, set exactly by a one-hot router: a fraction p of every rank's tokens
goes to rank 0's first ``hot`` experts (their top-K picks cycle over those; ``hot`` = N/R by default, so the
excess is spread over all of rank 0's experts; ``hot`` = 1 with top-1 puts it on ONE expert), the rest
round-robin over the other ranks' experts, so under the contiguous placement rank 0's max/mean load is p * R.
Per max/mean load:

    1. counts: the contiguous layers run ``--count-steps`` forward passes, counting the pairs each rank
       sends to each logical expert of each layer; the [R, N] blocks are all-reduced, so every rank
       computes the same placements with no further collective;
    2. placements: ``balanced_placement(counts_RN, R, N/R + red, prev=Placement.contiguous(N, R, red))``
       per layer and ``red`` in ``--redundant`` (prev: the layout a run with ``red`` redundant slots starts
       from);
    3. migration: ``migrate_many`` from Placement.contiguous(N, R, red) to each balanced placement on real
       slot tensors (expert weights plus AdamW-shaped exp_avg and exp_avg_sq, every layer in one
       all-to-all), ``--migrate-reps`` times; the moved weights are checked bit for bit against the
       variant's own freshly built layers (experts are initialised by logical id, so every variant holds
       the same experts);
    4. timing: every variant of every load takes one step in turn (round robin), warm-up + ``--steps``
       times. A step is forward + backward + ``sync_gradients`` (its return value, the replica-gradient
       sum, is the replica-sync time) + an AdamW step, timed by the straggler profiler as in
       profiling.bench.sweep (straggler = sum over layers and phases of max_r E_r - mean_r E_r).

Reported per variant: medians of step ms, straggler ms and straggler share of the step; the median of the
per-round step ratios to the contiguous variant of the same load (with its IQR); the replica-sync ms (median
of the min and of the max over ranks: the last rank to reach the all-reduce sees the collective alone, the
first also waits for it); the migration ms (median over repetitions of the slowest rank) and bytes; the
max/mean rank load predicted by ``Placement.rank_loads`` on the counts, and the one measured (rows each
rank's experts received, layer 0).

What-if (``profiling.analysis.whatif_placement``): per load, the contiguous variant's records are written
as a run
directory (config.yaml, straggler.jsonl, routing.jsonl with per-sender counts) under ``OUT/whatif``; the
expert cost E = a + c*n per (layer, phase) is fitted on the contiguous records of every load together, and
each variant's placement is scored with the all-reduce and all-to-all bandwidths measured here (replica-sync
bytes / min-over-ranks sync time; the busiest rank's migration bytes / migration time), then with both 10x
higher. Predicted and measured straggler shares are both ratios of means over the timed steps (the
what-if's definition).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn

from moe_dist.moe.placement import Placement
from moe_dist.moe.sync import sync_gradients
from moe_dist.placement.migrate import Job, migrate_many
from moe_dist.placement.rebalance import balanced_placement
from moe_dist.training.preflight import claim_out_dir
from profiling.analysis.report import load_ratio
from profiling.analysis.run_dir import Run, load_run
from profiling.analysis.whatif import cost_models, recorded
from profiling.analysis.whatif_placement import CommModel, expert_params, project_placements, replica_sync_ms
from profiling.bench.placement_table import markdown
from profiling.bench.sweep import SweepSpec, build_layers, forward_backward, gather_ranks, routed_inputs
from profiling.runtime.analysis import StragglerAnalyzer
from profiling.runtime.timer import StragglerTimer

log = logging.getLogger("moe_dist.placement_study")

GPU_FACTOR = 10.0
"""The what-if's second scenario: all-reduce and all-to-all bandwidth this many times the measured."""


@dataclass
class StudyOptions:
    loads: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0])
    redundant: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Redundant slots per rank of each balanced variant."""
    spec: SweepSpec = field(default_factory=SweepSpec)
    """Sizes, steps, top-K and hot experts of every experiment (its ``load`` is replaced per load)."""
    count_steps: int = 2
    migrate_reps: int = 3
    lr: float = 1e-4
    """AdamW's learning rate: small, so the expert outputs stay far below the router's one-hot margins."""


def variant_name(redundant: int | None) -> str:
    return "contiguous" if redundant is None else f"balanced+{redundant}"


class PlacedExperiment:
    """One (load, placement) variant on this rank: its layers, optimizer, timer and analyzer."""

    def __init__(
        self, rank: int, world: int, spec: SweepSpec, placements: list[Placement], lr: float
    ) -> None:
        torch.manual_seed(0)  # why: build_layers' expert init reads the seed (same experts in every variant)
        self.spec, self.world = spec, world
        self.timer = StragglerTimer(list(range(spec.layers)), rank, torch.device("cpu"))
        self.layers = build_layers(spec, world, self.timer, placements)
        for layer in self.layers:
            layer.router.weight.requires_grad_(False)  # why: the one-hot router sets the routing; keep it so
        self.model = nn.ModuleList(self.layers)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)
        self.x = routed_inputs(spec, rank, world)
        self.analyzer = StragglerAnalyzer(list(range(spec.layers)), world)
        self.records: list[dict] = []
        self.step_ms: list[float] = []
        self.sync_ms_R: list[list[float]] = []
        self.done = 0

    @torch.no_grad()
    def count_pairs(self, steps: int) -> list[list[list[float]]]:
        """Per layer, [R][N] mean pairs per forward that each rank sends to each logical expert (all ranks'
        rows, all-reduced)."""
        N = self.layers[0].cfg.num_experts
        rank = dist.get_rank() if self.world > 1 else 0
        c_MRN = torch.zeros(len(self.layers), self.world, N, dtype=torch.float64)
        for _ in range(steps):
            h = self.x
            for li, layer in enumerate(self.layers):
                topk_TK = layer.router(h.reshape(-1, h.shape[-1])).topk_idx_TK
                c_MRN[li, rank] += torch.bincount(topk_TK.reshape(-1), minlength=N).to(torch.float64)
                h = layer(h).hidden + h
        if self.world > 1:
            dist.all_reduce(c_MRN)
        self.timer.discard()  # why: the counting passes are not timed steps
        return (c_MRN / steps).tolist()

    def step(self) -> None:
        step = self.done
        if self.world > 1:
            dist.barrier()  # why: start every step together so step times compare across variants
        t0 = time.perf_counter()
        forward_backward(self.layers, self.x)
        sync_s = sync_gradients(self.model)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.x = self.x.detach()
        data = self.timer.collect()
        # one gather carries the profiler's [layers, FIELDS] block and, in an extra row, the sync ms
        extra = torch.zeros(1, data.shape[1], dtype=data.dtype)
        extra[0, 0] = sync_s * 1e3
        block = gather_ranks(torch.cat([data, extra]), self.world)
        elapsed = (time.perf_counter() - t0) * 1e3
        if step >= self.spec.warmup:
            self.step_ms.append(elapsed)
            self.sync_ms_R.append(block[:, -1, 0].tolist())
            self.records.append(self.analyzer.update(step, elapsed, block[:, :-1]))
        self.done += 1


def migration_slot_tensors(layers: list, rank: int) -> list[dict[str, torch.Tensor]]:
    """Per layer, the stacked tensors a migration moves: the expert weights and AdamW-shaped state."""
    g = torch.Generator().manual_seed(rank)
    out = []
    for layer in layers:
        tensors = {}
        for name, p in layer.experts.named_parameters():
            tensors[name] = p.detach()
            tensors[f"{name}.exp_avg"] = torch.randn(p.shape, generator=g)
            tensors[f"{name}.exp_avg_sq"] = torch.rand(p.shape, generator=g)
        out.append(tensors)
    return out


def measure_migration(
    spec: SweepSpec, rank: int, world: int, new: list[Placement], target: PlacedExperiment, reps: int
) -> dict:
    """Migrate every layer from Placement.contiguous(N, R, red) to ``new`` (one all-to-all), ``reps`` times on
    the same source tensors; check the moved weights against ``target``'s layers, which hold ``new``."""
    old = Placement.contiguous(new[0].num_experts, world, new[0].redundant)
    torch.manual_seed(0)  # why: the same expert init as every PlacedExperiment
    source = migration_slot_tensors(build_layers(spec, world, None, [old] * len(new)), rank)
    jobs = [Job(t, old, p) for t, p in zip(source, new, strict=True)]
    group = dist.group.WORLD if world > 1 else None
    secs, busiest = [], 0.0
    for _ in range(reps):
        if world > 1:
            dist.barrier()
        outs, stats = migrate_many(jobs, group)
        t = torch.tensor([stats.seconds, float(max(stats.bytes_sent, stats.bytes_received))])
        if world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank, the busiest link
        secs.append(float(t[0]))
        busiest = float(t[1])
    for out, layer in zip(outs, target.layers, strict=True):
        for name, p in layer.experts.named_parameters():
            if not torch.equal(out[name], p.detach()):
                raise RuntimeError(f"migration: {name} of layer {layer.layer_idx} differs from the target's")
    return {
        "migration_ms": statistics.median(secs) * 1e3,
        "migration_bytes": stats.bytes_total,
        "migration_busiest_bytes": busiest,
        "slots_changed": stats.slots_changed,
    }


def study(rank: int, world: int, opts: StudyOptions) -> dict | None:
    """Every load and variant on this rank (module doc); rank 0 returns the raw results, the others None."""
    per_rank = opts.spec.experts_per_rank
    N = per_rank * world
    loads = [x for x in opts.loads if x <= world]
    cells: list[dict] = []  # one per (load, variant): its experiment and what rank 0 reports
    for load in loads:
        spec = replace(opts.spec, load=load)
        contiguous = [Placement.contiguous(N, world)] * spec.layers
        base = PlacedExperiment(rank, world, spec, contiguous, opts.lr)
        counts = base.count_pairs(opts.count_steps)
        cells.append(
            {"load": load, "redundant": None, "exp": base, "placements": contiguous, "counts": counts}
        )
        for red in opts.redundant:
            prev = Placement.contiguous(N, world, red)
            places = [balanced_placement(c, world, per_rank + red, prev=prev) for c in counts]
            exp = PlacedExperiment(rank, world, spec, places, opts.lr)
            mig = measure_migration(spec, rank, world, places, exp, opts.migrate_reps)
            cells.append(
                {"load": load, "redundant": red, "exp": exp, "placements": places, "counts": counts, **mig}
            )
    total = max(c["exp"].spec.warmup + c["exp"].spec.steps for c in cells)
    for _ in range(total):
        for c in cells:  # why round robin: a slow spell of the shared machine hits every variant alike
            c["exp"].step()
    if rank != 0:
        return None
    out = []
    for c in cells:
        exp = c.pop("exp")
        out.append(
            {
                **c,
                "placements": [p.to_dict() for p in c["placements"]],
                "records": exp.records,
                "step_ms_steps": exp.step_ms,
                "sync_ms_steps": exp.sync_ms_R,
            }
        )
    return {"world": world, "options": asdict(opts), "cells": out}


# --- rank 0: summaries, the what-if, outputs ------------------------------------------------------------
def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[1], q[2]


def paired(cell: dict, ref: dict) -> tuple[float, float, float]:
    """Quartiles of the per-round step ratios cell / ref (round i of each: the same slice of machine time)."""
    return quartiles([a / b for a, b in zip(cell["step_ms_steps"], ref["step_ms_steps"], strict=True)])


def summarize(cell: dict, contiguous: dict, repacked: dict | None) -> dict:
    """One table row; ``repacked`` is the same load's balanced+0 cell (None: not measured)."""
    recs = cell["records"]
    places = [Placement.from_dict(p) for p in cell["placements"]]
    pred = [load_ratio(p.rank_loads(c)) for p, c in zip(places, cell["counts"], strict=True)]
    lo, mid, hi = paired(cell, contiguous)
    vs_repacked = paired(cell, repacked) if repacked is not None and cell["redundant"] else None
    sync = cell["sync_ms_steps"]
    return {
        "load": cell["load"],
        "placement": variant_name(cell["redundant"]),
        "redundant": cell["redundant"],
        "predicted_load_ratio": pred[0],
        "predicted_load_ratio_layers": pred,
        "measured_load_ratio": statistics.median(load_ratio(r["layers"][0]["n"]) for r in recs),
        "step_ms": statistics.median(cell["step_ms_steps"]),
        "vs_contiguous": mid,
        "vs_contiguous_iqr": [lo, hi],
        "vs_balanced0": None if vs_repacked is None else vs_repacked[1],
        "vs_balanced0_iqr": None if vs_repacked is None else [vs_repacked[0], vs_repacked[2]],
        "step_ms_steps": cell["step_ms_steps"],
        "straggler_ms": statistics.median(r["straggler_ms"] for r in recs),
        "straggler_frac": statistics.median(r["straggler_frac"] for r in recs),
        "token_explained_frac": statistics.median(r["token_explained_frac"] for r in recs),
        "mean_step_ms": statistics.fmean(cell["step_ms_steps"]),
        "mean_straggler_frac": statistics.fmean(r["straggler_ms"] for r in recs)
        / statistics.fmean(cell["step_ms_steps"]),
        "replica_sync_ms_min": statistics.median(min(s) for s in sync),
        "replica_sync_ms_max": statistics.median(max(s) for s in sync),
        "migration_ms": cell.get("migration_ms", 0.0),
        "migration_bytes": cell.get("migration_bytes", 0),
        "migration_busiest_bytes": cell.get("migration_busiest_bytes", 0.0),
        "slots_changed": cell.get("slots_changed", 0),
        "slots": cell["placements"][0]["slots"],
    }


def write_run_dir(path: Path, spec: SweepSpec, world: int, cell: dict) -> None:
    """The contiguous variant of one load as a run directory that profiling.analysis.whatif reads."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = {
        "name": path.name,
        "model": {
            "d_model": spec.d_model,
            "moe": {"num_experts": spec.experts_per_rank * world, "top_k": spec.top_k, "d_ff": spec.d_ff},
        },
        "parallel": {"ep": world},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    counts = cell["counts"]
    global_counts = [[sum(col) for col in zip(*c_RN, strict=True)] for c_RN in counts]
    with open(path / "straggler.jsonl", "w") as s, open(path / "routing.jsonl", "w") as r:
        for rec in cell["records"]:
            s.write(json.dumps(rec) + "\n")
            # why the warm-up counts for every step: the routing is fixed by construction
            r.write(
                json.dumps(
                    {"step": rec["step"], "tokens_per_expert": global_counts, "tokens_per_expert_RN": counts}
                )
                + "\n"
            )


def measured_bandwidths(rows: list[dict], params: int, cells: list[dict]) -> dict:
    """GB/s of the replica-sync all-reduce and of the migration all-to-all, medians over the variants."""
    ar, a2a = [], []
    for row, cell in zip(rows, cells, strict=True):
        places = [Placement.from_dict(p) for p in cell["placements"]]
        nbytes = sum(replica_sync_ms(p, params, 1.0)[0] for p in places)
        if nbytes and row["replica_sync_ms_min"] > 0:
            ar.append(nbytes / (row["replica_sync_ms_min"] / 1e3) / 1e9)
        if row["migration_busiest_bytes"] and row["migration_ms"] > 0:
            a2a.append(row["migration_busiest_bytes"] / (row["migration_ms"] / 1e3) / 1e9)
    return {
        "allreduce_gbps": statistics.median(ar) if ar else 1.0,
        "a2a_gbps": statistics.median(a2a) if a2a else 1.0,
        "allreduce_samples": len(ar),
        "a2a_samples": len(a2a),
    }


def whatif_rows(res: dict, rows: list[dict], out: Path) -> tuple[list[dict], dict]:
    """The what-if prediction of every measured variant at the measured bandwidths and at GPU_FACTOR x."""
    world, cells = res["world"], res["cells"]
    spec = SweepSpec(**{k: v for k, v in res["options"]["spec"].items() if k != "injection"})
    runs: dict[float, Run] = {}
    for cell in cells:
        if cell["redundant"] is None:
            d = out / "whatif" / f"load{cell['load']:g}"
            write_run_dir(d, spec, world, cell)
            runs[cell["load"]] = load_run(d)
    first = next(iter(runs.values()))
    pooled = Run(out, first.config, [r for run in runs.values() for r in run.straggler], {}, first.layers)
    costs = cost_models(pooled)  # why pooled: at one load the per-rank loads take only two values
    params = expert_params(first.config)
    bw = measured_bandwidths(rows, params, cells)
    comms = {
        "measured": CommModel(bw["allreduce_gbps"], bw["a2a_gbps"]),
        f"{GPU_FACTOR:g}x": CommModel(bw["allreduce_gbps"] * GPU_FACTOR, bw["a2a_gbps"] * GPU_FACTOR),
    }
    bases = {load: recorded(run, costs) for load, run in runs.items()}
    preds = []
    for row, cell in zip(rows, cells, strict=True):
        run, base = runs[cell["load"]], bases[cell["load"]]
        places = [Placement.from_dict(p) for p in cell["placements"]]
        entry = {"load": row["load"], "placement": row["placement"]}
        for tag, comm in comms.items():
            p = project_placements(run, costs, base, world, places, comm, params, name=row["placement"])
            entry[tag] = {
                k: p[k]
                for k in (
                    "load_ratio",
                    "straggler_ms",
                    "step_ms",
                    "straggler_frac",
                    "replica_sync_ms",
                    "migration_ms",
                    "amortised_migration_ms",
                )
            }
        m = entry["measured"]["straggler_frac"]
        entry["measured_over_predicted_frac"] = row["mean_straggler_frac"] / m if m > 0 else float("nan")
        entry["measured_over_predicted_step"] = row["mean_step_ms"] / entry["measured"]["step_ms"]
        preds.append(entry)
    bw["costs"] = {f"{k[0]}/{k[1]}": {"a_ms": c.a, "c_ms_per_row": c.c} for k, c in costs.items()}
    return preds, bw


def report(res: dict, out: Path, meta: dict | None = None) -> dict:
    """Summaries, what-if and files (placement_study.json, placement_study.md) from ``study``'s result."""
    out.mkdir(parents=True, exist_ok=True)
    cells = res["cells"]
    contiguous = {c["load"]: c for c in cells if c["redundant"] is None}
    repacked = {c["load"]: c for c in cells if c["redundant"] == 0}
    rows = [summarize(c, contiguous[c["load"]], repacked.get(c["load"])) for c in cells]
    preds, bw = whatif_rows(res, rows, out)
    table = markdown(rows, preds, bw, GPU_FACTOR)
    doc = {"meta": {**(meta or {}), "world": res["world"], "options": res["options"]}, "rows": rows}
    doc.update(whatif=preds, bandwidths=bw)
    (out / "placement_study.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "placement_study.md").write_text(table)
    log.info("wrote %s/placement_study.{json,md}\n%s", out, table)
    return doc


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


EXAMPLE = (
    "example: moe-dist placement-study --nproc 4 --out runs/pstudy --loads 1 2 3   "
    "(--nproc: ranks, moe-dist only; or: "
    "torchrun --nproc-per-node 4 -m profiling.bench.placement_study --out runs/pstudy)"
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m profiling.bench.placement_study", description=__doc__.split("\n\n")[0], epilog=EXAMPLE
    )
    ap.add_argument("--out", default="runs/pstudy")
    ap.add_argument("--loads", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    ap.add_argument("--redundant", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--hot-experts", type=int, default=None, help="rank 0's experts taking the hot tokens")
    ap.add_argument("--top-k", type=int, default=SweepSpec.top_k)
    ap.add_argument("--tokens", type=int, default=SweepSpec.tokens)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=SweepSpec.warmup)
    ap.add_argument("--migrate-reps", type=int, default=3)
    ap.add_argument("--overwrite", action="store_true", help="move a used --out aside (nothing deleted)")
    args = ap.parse_args(argv)
    # every rank checks before any process group; only rank 0 moves a used --out aside
    refusal = claim_out_dir(Path(args.out), args.overwrite, int(os.environ.get("RANK", 0)))
    if refusal:
        ap.error(refusal)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spec = SweepSpec(
        tokens=args.tokens,
        steps=args.steps,
        warmup=args.warmup,
        top_k=args.top_k,
        hot_experts=args.hot_experts,
    )
    opts = StudyOptions(loads=args.loads, redundant=args.redundant, spec=spec, migrate_reps=args.migrate_reps)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t0, load0 = time.time(), loadavg()
    try:
        res = study(rank, world, opts)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        meta = {
            "argv": sys.argv if argv is None else argv,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "loadavg_start": load0,
            "loadavg_end": loadavg(),
            "wall_s": time.time() - t0,
            "torch": torch.__version__,
        }
        report(res, Path(args.out), meta)


if __name__ == "__main__":
    main()
