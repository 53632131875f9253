"""Dispatch benchmark (issue 27): ``moe.dispatch`` pairs vs dedup, and ``moe.overlap_shared`` off vs on.

    python -m profiling.bench.dispatch --ranks 2 4 --experts 8 32 128 --topk 2 8 --out runs/bench_dispatch

Part 1, per (ranks, E, K, device-limited routing off/on): one MoE layer per dispatch, the same weights and
inputs, forward + backward of the layer, the two taking turns step by step (round robin, the order flipped
every round), a barrier before each step; a step's time is the slowest rank's. Reported: the median step
ms of each, and the median (with the interquartile range) of the per-round ratio dedup / pairs. Device-
limited routing is ``n_group`` = ranks, ``topk_group`` = 1 (each token's K experts on one rank); a case the
config refuses (K above the experts of one group) is listed as skipped. ``wire_bytes``: bytes the layer's
dispatch all-to-all sends across ranks per step, summed over ranks (``MoEStats.wire_bytes``: the rows, and
dedup's pair lists); ``wire_bytes_step``: everything the layer's token all-to-alls send in a forward and
backward (dispatch and combine, each reversed in backward; dedup's pair lists and their gradients).

Part 2, per ranks and dispatch, with one shared expert of width ``--shared-d-ff``: overlap off vs on,
taking turns the same way; ``shared_ms`` is the shared expert's forward + backward alone on the same tokens
(slowest rank), and ``a2a_ms`` the forward dispatch all-to-all time the straggler timer measures (off: the
whole all-to-all; on: the launch plus the wait left after the shared expert). The goal: off - on >= half
of ``shared_ms``, in at least three rounds of four (the first quartile of the per-round savings).

Routing: a freshly initialised router on Gaussian tokens (close to uniform over experts). fp32; the
machine's cores are shared by every rank (and by whatever else runs), so the wire is gloo over loopback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moe_dist import MoEConfig, MoELayer
from moe_dist.checkpoint.files import atomic_write_text
from moe_dist.errors import ConfigError
from moe_dist.runtime.spawn import run_ranks
from moe_dist.training.preflight import claim_out_dir
from profiling.runtime.timer import FIELDS, StragglerTimer

log = logging.getLogger("moe_dist.bench")
_A_DIS = FIELDS.index("A_dis")


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    """(median, first quartile, third quartile)."""
    if len(xs) < 2:
        return (xs[0], xs[0], xs[0])
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return (statistics.median(xs), q[0], q[2])


def _step_ms(layer: MoELayer, x: torch.Tensor) -> tuple[float, float, float]:
    """One timed forward + backward: (slowest rank's ms, dispatch wire bytes and rows summed over ranks)."""
    dist.barrier()  # why: every step starts together, so the slowest rank's time is the step's
    t0 = time.perf_counter()
    out = layer(x.detach().requires_grad_())
    (out.hidden.square().mean() + out.aux_loss).backward()
    ms = (time.perf_counter() - t0) * 1e3
    for p in layer.parameters():
        p.grad = None
    t = torch.tensor([ms], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    w = torch.tensor([out.stats.wire_bytes, out.stats.wire_rows], dtype=torch.float64)
    dist.all_reduce(w)
    return float(t), float(w[0]), float(w[1])


def _shared_ms(layer: MoELayer, x: torch.Tensor) -> float:
    """The shared experts' forward + backward alone on ``x`` (slowest rank)."""
    assert layer.shared_experts is not None
    dist.barrier()
    t0 = time.perf_counter()
    layer.shared_experts(x.detach().requires_grad_()).square().mean().backward()
    ms = (time.perf_counter() - t0) * 1e3
    for p in layer.parameters():
        p.grad = None
    t = torch.tensor([ms], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _turns(layers: dict[str, MoELayer], x: torch.Tensor, args: dict, extra=None) -> dict[str, list]:
    """Round robin over ``layers`` (order flipped every round); per name its step ms after warm-up, and the
    last step's wire bytes and rows. ``extra(i)`` runs once per round after the layers (timed by itself)."""
    ms: dict[str, list] = {n: [] for n in layers}
    ms["extra"] = []
    wire: dict[str, tuple[float, float]] = {}
    for i in range(args["warmup"] + args["iters"]):
        names = list(layers) if i % 2 == 0 else list(reversed(layers))
        for n in names:
            t, b, rows = _step_ms(layers[n], x)
            wire[n] = (b, rows)
            if i >= args["warmup"]:
                ms[n].append(t)
        if extra is not None:
            t = extra()
            if i >= args["warmup"]:
                ms["extra"].append(t)
    return {"ms": ms, "wire": wire}


def _layer(cfg: MoEConfig, hook=None) -> MoELayer:
    torch.manual_seed(0)  # why: every variant of a case gets the same weights
    group = dist.group.WORLD
    return MoELayer(cfg, ep_group=group, balance_group=group, timing_hook=hook)


def dispatch_worker(rank: int, world: int, args: dict) -> list[dict]:
    """Both parts on ``world`` ranks; rank 0's rows (the others return theirs too, unused)."""
    torch.set_num_threads(1)
    D, T = args["d_model"], args["tokens"]
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1000 + rank))
    rows = []
    for E in args["experts"]:
        for K in args["topk"]:
            for limited in (False, True):
                row = {
                    "part": "dispatch",
                    "ranks": world,
                    "experts": E,
                    "top_k": K,
                    "device_limited": limited,
                }
                groups = dict(n_group=world, topk_group=1) if limited else {}
                try:
                    cfg = MoEConfig(d_model=D, d_ff=args["d_ff"], num_experts=E, top_k=K, **groups)
                except ConfigError as e:
                    rows.append(dict(row, skipped=str(e)))
                    continue
                layers = {v: _layer(dataclasses.replace(cfg, dispatch=v)) for v in ("pairs", "dedup")}
                res = _turns(layers, x, args)
                for v in layers:
                    b, r = res["wire"][v]
                    pair_list_bytes = b - r * D * x.element_size()
                    row[f"{v}_ms"] = statistics.median(res["ms"][v])
                    row[v] = {
                        "wire_bytes": int(b),
                        "wire_rows": int(r),
                        "wire_bytes_step": int(4 * r * D * x.element_size() + 2 * pair_list_bytes),
                    }
                ratios = [d / p for d, p in zip(res["ms"]["dedup"], res["ms"]["pairs"], strict=True)]
                row["dedup_vs_pairs"] = _quantiles(ratios)
                row["bytes_ratio"] = row["dedup"]["wire_bytes"] / max(row["pairs"]["wire_bytes"], 1)
                rows.append(row)
                if rank == 0:
                    log.info("%s", row)
    for v in args["overlap_dispatch"]:
        cfg = MoEConfig(
            d_model=D,
            d_ff=args["d_ff"],
            num_experts=args["overlap_experts"],
            top_k=2,
            num_shared_experts=1,
            shared_d_ff=args["shared_d_ff"],
            dispatch=v,
        )
        timers = {o: StragglerTimer([0], rank, torch.device("cpu")) for o in ("off", "on")}
        layers = {
            o: _layer(dataclasses.replace(cfg, overlap_shared=o == "on"), timers[o]) for o in ("off", "on")
        }
        res = _turns(layers, x, args, extra=lambda off=layers["off"]: _shared_ms(off, x))
        row = {"part": "overlap", "ranks": world, "experts": cfg.num_experts, "top_k": 2, "dispatch": v}
        for o in ("off", "on"):
            a = timers[o].collect()[0, _A_DIS] / (args["warmup"] + args["iters"])  # mean over steps
            t = torch.tensor([float(a)], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            row[f"{o}_ms"] = statistics.median(res["ms"][o])
            row[f"{o}_a2a_ms"] = float(t)
        row["shared_ms"] = statistics.median(res["ms"]["extra"])
        saved = [a - b for a, b in zip(res["ms"]["off"], res["ms"]["on"], strict=True)]
        row["saved_ms"] = _quantiles(saved)
        # why the first quartile: a median saving on a loaded machine can exceed the all-to-all itself
        row["goal_met"] = row["saved_ms"][1] >= 0.5 * row["shared_ms"]
        rows.append(row)
        if rank == 0:
            log.info("%s", row)
    return rows


def markdown(rows: list[dict]) -> str:
    """The two tables of the results (docs/benchmarks.md)."""
    lines = [
        "| ranks | E | K | device-limited | pairs wire_bytes | dedup wire_bytes | bytes dedup/pairs | "
        "pairs ms | dedup ms | dedup/pairs time [IQR] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["part"] == "dispatch"):
        head = f"| {r['ranks']} | {r['experts']} | {r['top_k']} | {'yes' if r['device_limited'] else 'no'} |"
        if "skipped" in r:
            lines.append(head + " – | – | – | – | – | skipped: K > experts per group |")
            continue
        m, lo, hi = r["dedup_vs_pairs"]
        lines.append(
            f"{head} {r['pairs']['wire_bytes']:,} | {r['dedup']['wire_bytes']:,} | {r['bytes_ratio']:.2f} | "
            f"{r['pairs_ms']:.1f} | {r['dedup_ms']:.1f} | {m:.2f} [{lo:.2f}, {hi:.2f}] |"
        )
    lines += [
        "",
        "| ranks | E | dispatch | off ms | on ms | saved ms [IQR] | shared expert alone ms | "
        "dispatch a2a ms off / on | saved ≥ ½ shared (first quartile) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["part"] == "overlap"):
        m, lo, hi = r["saved_ms"]
        lines.append(
            f"| {r['ranks']} | {r['experts']} | {r['dispatch']} | {r['off_ms']:.1f} | {r['on_ms']:.1f} | "
            f"{m:.1f} [{lo:.1f}, {hi:.1f}] | {r['shared_ms']:.1f} | {r['off_a2a_ms']:.1f} / "
            f"{r['on_a2a_ms']:.1f} | {'yes' if r['goal_met'] else 'no'} |"
        )
    return "\n".join(lines)


EXAMPLE = (
    "example: moe-dist bench-dispatch --ranks 2 4 --experts 8 32 128 --topk 2 8 --out runs/bench_dispatch"
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m profiling.bench.dispatch", description=__doc__.split("\n\n")[0], epilog=EXAMPLE
    )
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--topk", type=int, nargs="+", default=[2, 8])
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=256, help="each routed expert's width")
    p.add_argument("--shared-d-ff", type=int, default=256, help="the shared expert's width (part 2)")
    p.add_argument("--overlap-experts", type=int, default=32, help="E of part 2 (K = 2)")
    p.add_argument("--overlap-dispatch", nargs="*", default=["pairs", "dedup"], choices=["pairs", "dedup"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=9)
    p.add_argument("--out", type=Path, default=None, help="a directory: dispatch.json and dispatch.md")
    p.add_argument("--overwrite", action="store_true", help="move a used --out aside (nothing deleted)")
    a = p.parse_args(argv)
    if a.out is not None:
        refusal = claim_out_dir(a.out, a.overwrite)
        if refusal:
            p.error(refusal)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = {k: getattr(a, k) for k in ("experts", "topk", "tokens", "d_model", "d_ff", "shared_d_ff")}
    args.update(overlap_experts=a.overlap_experts, overlap_dispatch=a.overlap_dispatch)
    args.update(warmup=a.warmup, iters=a.iters)
    rows: list[dict] = []
    for world in a.ranks:
        rows += run_ranks(dispatch_worker, world, args, timeout=3600)[0]
    table = markdown(rows)
    log.info("\n%s", table)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        meta = dict(vars(a), out=str(a.out), omp_num_threads=os.environ.get("OMP_NUM_THREADS"))
        atomic_write_text(a.out / "dispatch.json", json.dumps({"args": meta, "rows": rows}, indent=1))
        atomic_write_text(a.out / "dispatch.md", table + "\n")


if __name__ == "__main__":
    main()
