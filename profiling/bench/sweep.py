"""Imbalance sweep: expert-parallel MoE layers under a controlled routing skew, timed by the profiler.

    torchrun --nproc-per-node 4 -m profiling.bench.sweep --out runs/sweep [--loads 1 1.25 1.5 2 3 4]

Routing is set exactly: token features carry a one-hot block that the router (centroids = [I, 0]) turns
into logits, so each token's top-K is chosen by construction. A fraction p of every rank's tokens goes to
rank 0's experts and the rest round-robin over the other ranks' experts, so rank 0's load is
max/mean = p*R (p = 1/R is perfectly balanced). For each max/mean load it reports step time (forward +
backward of ``layers`` stacked MoE layers), straggler time, and two reference lines built from the first
(balanced) row b, neither a bound:

    proportional  t(b) + (rho/rho_b - 1) * E(b): the step if only the busiest rank's expert time grew,
                  and grew in proportion to its rows (E(b): the busiest rank's expert ms at the first row);
    expert-only   t(b) + E(rho) - E(b): the step if only the busiest rank's expert time changed, by what
                  was measured.

Expert time is a + c*n with a fixed part a (kernel launches, gathers) that does not grow with the rows, so
the measured step usually sits below the proportional line; the gap between the measured step and the
expert-only line is what the load changed outside the experts (all-to-all transfer, waits).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from moe_dist import MoEConfig, MoELayer
from moe_dist.training.preflight import claim_out_dir
from profiling.runtime.analysis import StragglerAnalyzer
from profiling.runtime.timer import Injection, StragglerTimer

log = logging.getLogger("moe_dist.sweep")


@dataclass
class SweepSpec:
    load: float = 1.0
    """Target max/mean token load of rank 0 (1 = balanced; at most the number of ranks)."""
    tokens: int = 2048
    d_model: int = 128
    d_ff: int = 512
    experts_per_rank: int = 2
    top_k: int = 2
    hot_experts: int | None = None
    """How many of rank 0's experts take the hot tokens (their K picks cycle over them); None = all L. The
    excess lies on ONE expert (1: only replicas spread it) or on all of rank 0's (L: re-packing helps)."""
    layers: int = 2
    steps: int = 8
    warmup: int = 2
    injection: Injection = field(default_factory=Injection)
    timers: bool = True
    shared_d_ff: int = 0
    """Width of one shared expert beside the routed ones (0: none)."""
    overlap: bool = False
    """moe.overlap_shared: the shared expert runs while the dispatch all-to-all is in flight."""


def forward_backward(layers: list, x: torch.Tensor) -> None:
    """One forward and backward of ``layers`` on ``x``, with the residual stream between layers."""
    h = x.requires_grad_()
    for layer in layers:
        h = layer(h).hidden + h
    h.square().mean().backward()


def gather_ranks(data: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's ``data`` stacked along a new first dim (rank order); one all-gather, none at world 1."""
    if world == 1:
        return data.unsqueeze(0)
    gathered = [torch.empty_like(data) for _ in range(world)]
    dist.all_gather(gathered, data)
    return torch.stack(gathered)


def routed_inputs(spec: SweepSpec, rank: int, world: int) -> torch.Tensor:
    """Tokens whose top-K is set by construction (see the module docstring)."""
    L, K, T, D = spec.experts_per_rank, spec.top_k, spec.tokens, spec.d_model
    H = L if spec.hot_experts is None else spec.hot_experts
    N = L * world
    if not 1.0 <= spec.load <= world or not K <= H <= L or N >= D:
        raise ValueError(
            f"need 1 <= load <= {world}, top_k <= hot_experts <= experts_per_rank, N < d_model; got {spec}"
        )
    hot = round(T * spec.load / world)
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(T, D, generator=g) * 0.1
    others = list(range(L, N))
    for t in range(T):
        if t < hot:
            chosen = [(t + k) % H for k in range(K)]
        else:
            chosen = [others[(t * K + k) % len(others)] for k in range(K)] if others else list(range(K))
        for i, e in enumerate(chosen):
            x[t, e] = 8.0 - i  # distinct margins: the choice is exact, K-th pick included
    return x


def build_layers(spec: SweepSpec, world: int, hook, placements: list | None = None) -> list[MoELayer]:
    """``spec.layers`` stacked layers with the one-hot router; ``placements[i]`` (a ``Placement``) for layer
    i, or the contiguous layout when None."""
    N = spec.experts_per_rank * world
    cfg = MoEConfig(
        d_model=spec.d_model,
        d_ff=spec.d_ff,
        num_experts=N,
        top_k=spec.top_k,
        aux_loss_coef=0.0,
        residual=False,
        num_shared_experts=1 if spec.shared_d_ff else 0,
        shared_d_ff=spec.shared_d_ff or None,
        overlap_shared=spec.overlap,
    )
    group = dist.group.WORLD if world > 1 else None
    layers = []
    for i in range(spec.layers):
        place = placements[i] if placements is not None else None
        layer = MoELayer(
            cfg, ep_group=group, balance_group=group, layer_idx=i, timing_hook=hook, placement=place
        )
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[:, :N] = torch.eye(N)
        layers.append(layer)
    return layers


class LayerExperiment:
    """One spec's stacked layers, timer and analyzer on this rank; ``step()`` runs one timed step."""

    def __init__(self, rank: int, world: int, spec: SweepSpec) -> None:
        torch.manual_seed(0)
        self.spec, self.world = spec, world
        self.timer = StragglerTimer(list(range(spec.layers)), rank, torch.device("cpu"), spec.injection)
        self.timer.enabled = spec.timers
        self.layers = build_layers(spec, world, self.timer if spec.timers else None)
        self.x = routed_inputs(spec, rank, world)
        self.analyzer = StragglerAnalyzer(list(range(spec.layers)), world)
        self.records: list[dict] = []
        self.step_ms: list[float] = []
        self.done = 0

    @property
    def total_steps(self) -> int:
        return self.spec.warmup + self.spec.steps

    def step(self) -> None:
        step = self.done
        if self.world > 1:
            dist.barrier()  # why: start every step together so step times compare across loads
        t0 = time.perf_counter()
        forward_backward(self.layers, self.x)
        for layer in self.layers:
            for p in layer.parameters():
                p.grad = None  # as after an optimizer step
        self.x = self.x.detach()
        if self.spec.timers:  # timers off means no gather either: the overhead benchmark compares both
            block = gather_ranks(self.timer.collect(), self.world)
        elapsed = (time.perf_counter() - t0) * 1e3  # the step includes the profiler's own gather
        if step >= self.spec.warmup:
            self.step_ms.append(elapsed)
            if self.spec.timers:
                self.records.append(self.analyzer.update(step, elapsed, block))
        self.done += 1

    def result(self) -> dict:
        return {"records": self.records, "step_ms": self.step_ms}


def run_layer_experiment(rank: int, world: int, spec: SweepSpec) -> dict:
    """Timed steps on every rank; rank 0 returns the analyzer records and step times."""
    exp = LayerExperiment(rank, world, spec)
    for _ in range(exp.total_steps):
        exp.step()
    return exp.result()


def summarize(load: float, res: dict) -> dict:
    recs = res["records"]
    e_max = [sum(max(entry[p]["E"]) for entry in r["layers"] for p in ("fwd", "bwd")) for r in recs]
    return {
        "load": load,
        "step_ms": statistics.median(res["step_ms"]),
        "straggler_ms": statistics.median(r["straggler_ms"] for r in recs),
        "straggler_frac": statistics.median(r["straggler_frac"] for r in recs),
        "token_explained_frac": statistics.median(r["token_explained_frac"] for r in recs),
        "expert_ms_max_rank": statistics.median(e_max),
    }


EXAMPLE = (
    "example: moe-dist sweep --nproc 4 --out runs/sweep --loads 1 1.5 2 3   "
    "(--nproc: ranks, moe-dist only; or: "
    "torchrun --nproc-per-node 4 -m profiling.bench.sweep --out runs/sweep)"
)


def readable(row: dict) -> str:
    """One row for the console: ms to 0.1, fractions as percents."""
    return (
        f"step {row['step_ms']:.1f} ms, straggler {row['straggler_ms']:.1f} ms "
        f"({100 * row['straggler_frac']:.0f}% of step), "
        f"token-explained {100 * row['token_explained_frac']:.0f}%, "
        f"busiest rank's expert time {row['expert_ms_max_rank']:.1f} ms"
    )


def reference_lines(rows: list[dict]) -> None:
    """Add the proportional (``ideal_step_ms``) and expert-only (``expert_only_step_ms``) reference step times
    to each row, both from the first row (see the module docstring)."""
    base = rows[0]
    for r in rows:
        r["ideal_step_ms"] = base["step_ms"] + (r["load"] / base["load"] - 1) * base["expert_ms_max_rank"]
        r["expert_only_step_ms"] = base["step_ms"] + r["expert_ms_max_rank"] - base["expert_ms_max_rank"]


LINE_LABELS = {
    "step_ms": "measured step time (median)",
    "straggler_ms": "straggler time: Σ layers, phases of max_r E_r − mean_r E_r",
    "ideal_step_ms": "step if busiest rank's expert time ∝ its load (scaled from the first row)",
    "expert_only_step_ms": "step if only busiest rank's expert time changed (measured)",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m profiling.bench.sweep", description=__doc__.split("\n\n")[0], epilog=EXAMPLE
    )
    parser.add_argument("--out", default="runs/sweep")
    parser.add_argument("--loads", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0, 3.0, 4.0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--overwrite", action="store_true", help="move a used --out aside (nothing deleted)")
    args = parser.parse_args(argv)
    # every rank checks before any process group; only rank 0 moves a used --out aside
    refusal = claim_out_dir(Path(args.out), args.overwrite, int(os.environ.get("RANK", 0)))
    if refusal:
        parser.error(refusal)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    try:
        for load in args.loads:
            if load > world:
                if rank == 0:
                    log.info("skipping load %.2f: at most %d with %d ranks", load, world, world)
                continue
            res = run_layer_experiment(
                rank, world, SweepSpec(load=load, tokens=args.tokens, steps=args.steps)
            )
            if rank == 0:
                rows.append(summarize(load, res))
                log.info("load %.2f: %s", load, readable(rows[-1]))
    finally:
        dist.destroy_process_group()
    if rank == 0:
        write_outputs(Path(args.out), rows, world, args)


def write_outputs(out: Path, rows: list[dict], world: int, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    reference_lines(rows)
    meta = {
        "ranks": world,
        "tokens_per_rank": args.tokens,
        "steps": args.steps,
        "spec": asdict(SweepSpec(tokens=args.tokens, steps=args.steps)),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    (out / "sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "| max/mean load | step ms | straggler ms | straggler % of step | token-explained | "
        "step ms if expert time ∝ load | step ms if only expert time changed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['load']:.2f} | {r['step_ms']:.1f} | {r['straggler_ms']:.1f} | "
            f"{100 * r['straggler_frac']:.0f}% | {100 * r['token_explained_frac']:.0f}% | "
            f"{r['ideal_step_ms']:.1f} | {r['expert_only_step_ms']:.1f} |"
        )
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    loads = [r["load"] for r in rows]
    for key, style in (
        ("step_ms", "o-"),
        ("straggler_ms", "s-"),
        ("ideal_step_ms", "--"),
        ("expert_only_step_ms", ":"),
    ):
        ax.plot(loads, [r[key] for r in rows], style, label=LINE_LABELS[key])
    ax.set_xlabel("max/mean token load per rank")
    ax.set_ylabel("ms per step (fwd+bwd)")
    ax.set_title(f"{world} ranks, {args.tokens} tokens/rank")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    log.info("wrote %s/sweep.{json,md,png}\n%s", out, "\n".join(lines))


if __name__ == "__main__":
    main()


def run_specs(rank: int, world: int, specs: list[SweepSpec]) -> list[dict]:
    """Several experiments in one process group (tests and benchmarks amortise the start-up)."""
    return [run_layer_experiment(rank, world, s) for s in specs]


def run_specs_interleaved(rank: int, world: int, specs: list[SweepSpec]) -> list[dict]:
    """Like ``run_specs``, but the experiments take turns step by step (round robin), so a slow spell of a
    shared machine hits every spec alike and step i of each can be compared with step i of another."""
    exps = [LayerExperiment(rank, world, s) for s in specs]
    for i in range(max(e.total_steps for e in exps)):
        for e in exps:
            if i < e.total_steps:
                e.step()
    return [e.result() for e in exps]
