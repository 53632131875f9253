"""Layer benchmark: our MoELayer (dropless, with capacity, and without communication) vs DeepSpeed's and
torchtitan's MoE layers vs dense FFNs of equal active FLOPs (d_ff * K wide), in one run, on the same process
group and the same inputs.

    python -m profiling.bench.layer --ranks 2 --experts 8 32 128 --topk 2 --tokens 4096 --out BENCH.json

Every rank runs forward + backward; a step's time is the slowest rank's (barrier before each step); we
report the median of ``--iters`` steps after ``--warmup``, and ratios to dense: the median of the
per-round ratios (the layers take turns, so round i pairs each layer with the dense step next to it),
with their interquartile range. Each MoE layer's ratio is to the dense FFN of its own expert type:
``dense`` (GELU) or ``dense_swiglu``. ``--activation`` sets our layer's experts (and so the dense FFN
ours is compared with); torchtitan's experts are always SwiGLU, and DeepSpeed's are the GELU FFN it is given.

``ours_nocomm`` is our dropless layer with its token all-to-alls replaced by same-size local copies
(``profiling.bench.nocomm``): the floor of this machine for the layer without the wire and the waits in it.
``wire_only`` is that wire alone: the layer's four token all-to-alls on T·K rows at even splits, no compute;
``ours_nocomm`` + ``wire_only`` (both as ratios to dense) is the floor with the wire.

``--dtype bf16`` runs every layer's forward under CPU autocast to bfloat16 (backward outside it), fp32
weights and inputs for all. After every timed step an untimed SGD step updates every layer's weights in
place (one optimizer step per forward + backward), so weight casts that a layer caches per optimizer step
(our ``CastCache``) are redone each step, as in training without gradient accumulation.

Peers that are not installed (DeepSpeed; torchtitan from the ``bench`` extra) are skipped with one log
line. ``--skew RHO`` routes a chosen share of tokens to rank 0's experts (max/mean rank load RHO) for every
layer, by setting the gate weights of every MoE layer to the same one-hot router
(``profiling.bench.sweep.routed_inputs``). The layers take turns step by step, so a drifting machine slows all
of them alike. Memory: the peak of tensor bytes allocated during one more forward + backward of each layer
(the CUDA allocator's peak, or on CPU the profiler's memory events), the largest over ranks. Host memory:
``--host-memory retain`` (the default) starts the ranks under mimalloc with freed memory kept, as the
trainer runs on CPU (moe_dist/hostmem.py); each row records the allocator and, per layer, the median minor
page faults and process CPU ms (user + system) of a step, largest rank: on a shared machine the CPU time is
what other processes disturb least.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from moe_dist import MoEConfig, MoELayer
from moe_dist.moe.experts import apply_activation, hidden_width
from moe_dist.runtime.hostmem import allocator_for_children, allocator_in_use, retain_freed_memory
from moe_dist.runtime.spawn import run_ranks
from profiling.bench.nocomm import nocomm_layer, wire_only
from profiling.bench.peers import PeerMissing, Torchtitan, deepspeed_moe
from profiling.bench.sweep import SweepSpec, routed_inputs
from profiling.runtime.quiet import without_kineto_markers

log = logging.getLogger("moe_dist.bench")


DTYPES = {"fp32": None, "bf16": torch.bfloat16}
"""--dtype: the autocast dtype of every layer's forward (None: no autocast)."""
LR = 1e-4
"""Learning rate of the untimed SGD step between timed steps (it only has to change the weights in place)."""


class DenseFFN(nn.Module):
    """FFN(u) = act(u W1) W2, or gated (SwiGLU: W1 = [W_gate | W_up], 2f wide), as our experts compute it."""

    def __init__(self, d: int, f: int, activation: str = "gelu") -> None:
        super().__init__()
        self.activation = activation
        self.up = nn.Linear(d, hidden_width(f, activation), bias=False)
        self.down = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(apply_activation(self.up(x), self.activation))


def dense_name(activation: str) -> str:
    """The dense contestant of an expert type: "dense" (GELU, the original column) or "dense_<act>"."""
    return "dense" if activation == "gelu" else f"dense_{activation}"


def _one_step(fn, params: list, x: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    xi = x.detach().requires_grad_()
    # why backward outside autocast: as torch's AMP recipe runs it (autocast records the casts in forward)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = fn(xi).float().square().mean()
    loss.backward()


@torch.no_grad()
def optimizer_step(params: list) -> None:
    """Untimed, after every timed step: p -= LR * grad in place, then grads to None (as in training).

    why in place: the version counter moves, so a layer that caches low-precision weight copies per
    optimizer step (our CastCache) casts again, as it would after a real optimizer step.
    """
    for p in params:
        if p.grad is not None:
            p.add_(p.grad, alpha=-LR)
        p.grad = None


def peak_memory_mb(fn, params: list, x: torch.Tensor, dtype: torch.dtype | None = None) -> float:
    """Peak bytes of tensors allocated during one forward + backward, above what was live before.

    CUDA: the caching allocator's peak. CPU: the profiler's memory events, the running "Total Allocated"
    taken relative to its value before the step's first allocation.
    """
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        base = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        _one_step(fn, params, x, dtype)
        peak = (torch.cuda.max_memory_allocated(x.device) - base) / 2**20
        optimizer_step(params)
        return peak
    from torch.profiler import ProfilerActivity, profile

    with without_kineto_markers(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _one_step(fn, params, x, dtype)
    optimizer_step(params)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not mem:
        return 0.0
    # why relative: the profiler's running total carries over tensors from earlier profiled steps
    base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] - base for e in mem) / 2**20


def time_layers(
    layers: dict, x: torch.Tensor, warmup: int, iters: int, world: int, dtype: torch.dtype | None = None
) -> dict[str, tuple]:
    """Per layer: the slowest rank's fwd+bwd ms of each timed step, the largest rank's peak MB of one
    further (profiled, untimed) step, and the largest rank's minor page faults and CPU ms of each timed step.

    The layers take turns step by step (round robin), so slow drifts of a shared machine hit all alike,
    and step i of every layer can be paired with step i of the dense layer. Each step is followed by an
    untimed ``optimizer_step``.
    """
    times: dict[str, list[float]] = {name: [] for name in layers}
    host: dict[str, list[tuple[float, float]]] = {name: [] for name in layers}  # (faults, CPU ms)
    for i in range(warmup + iters):
        for name, (fn, params) in layers.items():
            if world > 1:
                dist.barrier()
            f0, c0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
            t0 = time.perf_counter()
            _one_step(fn, params, x, dtype)
            ms = (time.perf_counter() - t0) * 1e3
            cpu_ms = (time.process_time() - c0) * 1e3
            minflt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            optimizer_step(params)
            stat = torch.tensor([ms, float(minflt), cpu_ms], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(stat, op=dist.ReduceOp.MAX)
            if i >= warmup:
                times[name].append(float(stat[0]))
                host[name].append((float(stat[1]), float(stat[2])))
    peaks = {}
    for name, (fn, params) in layers.items():
        mb = torch.tensor([peak_memory_mb(fn, params, x, dtype)])
        if world > 1:
            dist.all_reduce(mb, op=dist.ReduceOp.MAX)
        peaks[name] = float(mb)
    return {name: (ts, peaks[name], host[name]) for name, ts in times.items()}


def summarise(row: dict, timed: dict[str, tuple], refs: dict[str, str] | None = None) -> None:
    """Medians, and each layer's ratio to its dense layer as the median of its per-round ratios (paired
    steps).

    ``timed[name]`` is (step ms, peak MB) or (step ms, peak MB, (page faults, CPU ms) per step). ``refs``
    names each MoE layer's dense layer (default "dense"); layers named "dense..." are the references."""
    refs = refs or {}
    for name, (ts, mem, *host) in timed.items():
        row[f"{name}_ms"] = statistics.median(ts)
        row[f"{name}_peak_mb"] = mem
        if host:
            row[f"{name}_faults"] = statistics.median(f for f, _ in host[0])
            row[f"{name}_cpu_ms"] = statistics.median(c for _, c in host[0])
        if not name.startswith("dense"):
            ref = refs.get(name, "dense")
            row[f"{name}_dense"] = ref
            ratios = sorted(t / d for t, d in zip(ts, timed[ref][0], strict=True))
            row[f"{name}_vs_dense"] = statistics.median(ratios)
            # the middle half of the paired ratios: how much one run's figure can be trusted
            row[f"{name}_vs_dense_iqr"] = [ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]]


def ours(cfg: MoEConfig, group, skew: float | None, nocomm: bool = False):
    """Our layer on ``group``; ``nocomm``: with same-size local copies for its all-to-alls."""
    # why the same seed for every variant: the same router weights route the same tokens to the same experts,
    # so dropless, capacity and nocomm see one load imbalance between the ranks, not three different ones
    torch.manual_seed(0)
    layer = nocomm_layer(cfg, group) if nocomm else MoELayer(cfg, ep_group=group, balance_group=group)
    if skew is not None:
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[:, : cfg.num_experts] = torch.eye(cfg.num_experts)
    return (lambda x: layer(x).hidden), list(layer.parameters())


def _peers(rank: int, world: int, args: dict) -> tuple[bool, Torchtitan | None]:
    """Set up the peer libraries once per rank; one that is missing is skipped with one log line."""
    ds_ok = args["deepspeed"]
    if ds_ok:
        try:
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")
        except Exception as e:  # noqa: BLE001 - the benchmark still reports the other layers
            if rank == 0:
                log.warning("DeepSpeed skipped: %s", e)
            ds_ok = False
    titan = None
    if args["torchtitan"]:
        try:
            titan = Torchtitan(world)
        except PeerMissing as e:
            if rank == 0:
                log.warning("torchtitan skipped (pip install -e '.[bench]', see README): %s", e)
    return ds_ok, titan


def bench_worker(rank: int, world: int, args: dict) -> list[dict]:
    torch.set_num_threads(1)
    allocator = allocator_in_use()  # mimalloc when main() started this rank under it
    if args["host_memory"] == "retain" and allocator != "mimalloc" and retain_freed_memory():
        allocator += " mallopt"  # the trainer's fallback where mimalloc is missing
    group = dist.group.WORLD if world > 1 else None
    ds_ok, titan = _peers(rank, world, args)
    act, dtype = args["activation"], DTYPES[args["dtype"]]
    rows = []
    for n, k, tokens in itertools.product(args["experts"], args["topk"], args["tokens"]):
        d, f = args["d_model"], args["d_ff"]
        torch.manual_seed(0)
        skew = args["skew"]
        if skew is not None:
            spec = SweepSpec(load=skew, tokens=tokens, d_model=d, experts_per_rank=n // world, top_k=k)
            x = routed_inputs(spec, rank, world)
        else:
            x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(rank))
        base = dict(d_model=d, d_ff=f, num_experts=n, top_k=k, aux_loss_coef=1e-2, residual=False)
        base["activation"] = act
        moes = {  # name: (contestant, its experts' activation)
            "ours_dropless": (ours(MoEConfig(**base), group, skew), act),
            "ours_cf1.25": (ours(MoEConfig(**base, capacity_factor=1.25), group, skew), act),
        }
        if group is not None:  # on one rank there is no all-to-all to take away
            moes["ours_nocomm"] = (ours(MoEConfig(**base), group, skew, nocomm=True), act)
            moes["wire_only"] = ((wire_only(k, group), []), act)
        if ds_ok:
            moes["deepspeed_cf1.25"] = (deepspeed_moe(DenseFFN(d, f), d, n, k, world, 1.25, skew), "gelu")
        if titan is not None:
            moes["torchtitan"] = (titan.moe(d, f, n, k, skew), "swiglu")
        layers = {}
        for a in dict.fromkeys(a for _, a in moes.values()):  # one dense FFN per expert type, first
            dense = DenseFFN(d, f * k, a)
            layers[dense_name(a)] = (dense, list(dense.parameters()))
        layers.update({name: c for name, (c, _) in moes.items()})
        row = {
            "ranks": world,
            "experts": n,
            "top_k": k,
            "tokens_per_rank": tokens,
            "d_model": d,
            "d_ff": f,
            "dtype": args["dtype"],
            "activation": act,
            "skew": skew,
            "host_memory": args["host_memory"],
            "host_allocator": allocator,
        }
        timed = time_layers(layers, x, args["warmup"], args["iters"], world, dtype)
        summarise(row, timed, {name: dense_name(a) for name, (_, a) in moes.items()})
        rows.append(row)
        if rank == 0:
            log.info("%s", {k_: (round(v, 3) if isinstance(v, float) else v) for k_, v in row.items()})
    return rows


def markdown(rows: list[dict]) -> str:
    """One line per row: each dense layer's ms (peak MB), then each MoE layer's ms (×its dense [IQR]) MB."""
    first = rows[0]
    denses = [k.removesuffix("_peak_mb") for k in first if k.startswith("dense") and k.endswith("_peak_mb")]
    names = [k.removesuffix("_vs_dense") for k in first if k.endswith("_vs_dense")]  # the MoE layers
    head = (
        "| R | E | K | T/rank | dtype | ours act | "
        + " | ".join(f"{n} ms (MB)" for n in denses)
        + " | "
        + " | ".join(f"{n} ms (×{first.get(n + '_dense', 'dense')} [IQR]) MB" for n in names)
        + " |"
    )
    lines = [head, "|" + "---|" * (6 + len(denses) + len(names))]
    for r in rows:
        dense_cells = [
            f"{r[n + '_ms']:.1f} ({r[n + '_peak_mb']:.0f})" if n + "_ms" in r else "–" for n in denses
        ]
        cells = [
            f"{r[n + '_ms']:.1f} ({r[n + '_vs_dense']:.2f}× [{r[n + '_vs_dense_iqr'][0]:.2f}, "
            f"{r[n + '_vs_dense_iqr'][1]:.2f}]) {r[n + '_peak_mb']:.0f}"
            if n + "_ms" in r
            else "–"
            for n in names
        ]
        lines.append(
            f"| {r['ranks']} | {r['experts']} | {r['top_k']} | {r['tokens_per_rank']} | "
            f"{r.get('dtype', 'fp32')} | {r.get('activation', 'gelu')} | "
            + " | ".join(dense_cells + cells)
            + " |"
        )
    return "\n".join(lines)


EXAMPLE = "example: moe-dist bench-layer --ranks 2 --experts 8 32 --tokens 4096 --out bench/layer.json"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m profiling.bench.layer", description=__doc__.split("\n\n")[0], epilog=EXAMPLE
    )
    p.add_argument("--ranks", type=int, nargs="+", default=[2])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--topk", type=int, nargs="+", default=[2])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--skew", type=float, default=None, help="max/mean rank load via a one-hot router")
    p.add_argument("--activation", choices=["gelu", "swiglu"], default="gelu", help="our layer's experts")
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="fp32",
        help="bf16: every layer's forward under CPU autocast to bfloat16 (fp32 weights and inputs)",
    )
    p.add_argument("--no-deepspeed", action="store_true")
    p.add_argument("--no-torchtitan", action="store_true")
    p.add_argument(
        "--host-memory",
        choices=["retain", "release"],
        default="retain",
        help="retain: ranks run under mimalloc keeping freed memory, as the trainer does on CPU; "
        "release: glibc's default",
    )
    p.add_argument("--out", default=None, help="write JSON here (and a .md table beside it)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = {
        "experts": a.experts,
        "topk": a.topk,
        "tokens": a.tokens,
        "d_model": a.d_model,
        "d_ff": a.d_ff,
        "warmup": a.warmup,
        "iters": a.iters,
        "skew": a.skew,
        "activation": a.activation,
        "dtype": a.dtype,
        "deepspeed": not a.no_deepspeed,
        "torchtitan": not a.no_torchtitan,
        "host_memory": a.host_memory,
    }
    rows: list[dict] = []
    with allocator_for_children(a.host_memory == "retain"):
        for world in a.ranks:
            rows += run_ranks(bench_worker, world, args, timeout=3600)[0]
    table = markdown(rows)
    log.info("\n%s", table)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
        out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
