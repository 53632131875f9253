"""Rank-side bodies for the distributed layer tests (run under tests.helpers.launch.run_ranks)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

import moe_dist.moe.experts as moe_experts
from moe_dist import MoEConfig, MoELayer
from tests.helpers.oracle import Case, make_tensors


def build_layer(case: Case, t: dict, rank: int, world: int, group) -> MoELayer:
    cfg = MoEConfig(**case.cfg)
    layer = MoELayer(cfg, ep_group=group, balance_group=group).double()
    L = cfg.num_experts // world
    with torch.no_grad():
        layer.router.weight.copy_(t["router"])
        layer.router.expert_bias.copy_(t["bias"])
        layer.experts.w1.copy_(t["w1"][rank * L : (rank + 1) * L])
        layer.experts.w2.copy_(t["w2"][rank * L : (rank + 1) * L])
    return layer


def layer_case_worker(rank: int, world: int, cases: list[Case]) -> list[dict]:
    """Forward + backward of <h, cot> + aux on this rank's tokens, for every case."""
    group = dist.group.WORLD if world > 1 else None
    results = []
    for case in cases:
        t = make_tensors(case)
        layer = build_layer(case, t, rank, world, group)
        x = t["xs"][rank].clone().requires_grad_()
        out = layer(x)
        loss = (out.hidden * t["cot"][rank]).sum() + out.aux_loss
        loss.backward()
        results.append(layer_results(layer, out, x))
    return results


def accumulation_worker(rank: int, world: int, case: Case, micro: int) -> dict:
    """global_batch scope over ``micro`` micro-batches: the switch term of each, and the final window."""
    group = dist.group.WORLD if world > 1 else None
    t = make_tensors(case)
    layer = build_layer(case, t, rank, world, group)
    x_all = t["xs"][rank]
    switch, Ps = [], []
    for chunk in x_all.chunk(micro):
        out = layer(chunk)
        switch.append(out.terms["switch"].detach())
        Ps.append(out.stats.P)
    counts = layer.window_counts.clone()
    tokens = layer.window_tokens.clone()
    used = layer.update_expert_bias()
    return {
        "switch": switch,
        "P": Ps,
        "window_counts": counts,
        "window_tokens": tokens,
        "used": used,
        "after_reset": layer.window_counts.clone(),
    }


def bias_worker(rank: int, world: int, case: Case, steps: int) -> dict:
    """Skewed router + bias updates only: global max/mean load per step, and the final bias."""
    group = dist.group.WORLD if world > 1 else None
    t = make_tensors(case)
    layer = build_layer(case, t, rank, world, group)
    g = torch.Generator().manual_seed(100 + rank)
    maxvio = []
    for _ in range(steps):
        x = torch.randn(256, case.cfg["d_model"], generator=g, dtype=torch.float64) + 2.0
        with torch.no_grad():
            out = layer(x)
        n = out.stats.tokens_per_expert.double()
        maxvio.append(float(n.max() / n.mean() - 1))
        layer.update_expert_bias()
    return {"maxvio": maxvio, "bias": layer.router.expert_bias.clone()}


def nan_worker(rank: int, world: int, case: Case) -> None:
    """Rank 1 feeds a NaN token; every rank must raise NonFiniteError, none may hang."""
    group = dist.group.WORLD
    t = make_tensors(case)
    layer = build_layer(case, t, rank, world, group)
    layer.layer_idx = 7
    x = t["xs"][rank].clone()
    if rank == 1:
        x[0, 0] = float("nan")
    layer(x)


def skip_collective_worker(rank: int, world: int, case: Case, skip: str) -> None:
    """Rank 1 leaves out one stage's collectives (``skip`` = "dispatch" or "combine") and lingers; rank 0
    must fail with an error that names the layer and the stage, not hang."""
    import time

    group = dist.group.WORLD
    t = make_tensors(case)
    layer = build_layer(case, t, rank, world, group)
    layer.layer_idx = layer.dispatcher.layer = 3
    x = t["xs"][rank].clone()
    if rank == 1:
        route, plan, bal = layer._route(x)
        if skip == "combine":
            x_PD, counts, meta = layer.dispatcher.dispatch(x, plan, bal.kept_counts_RN)
            layer.experts(x_PD, counts)
        time.sleep(7)  # alive but absent: rank 0 must time out, not see a closed connection
        return
    layer(x)


@contextmanager
def count_folding(on: bool) -> Iterator[None]:
    """Layers built inside fold their dispatch counts into the statistics all-reduce (``on``, the default)
    or send them with their own all-to-all."""
    import moe_dist.moe.layer as layer_mod

    cap = layer_mod.MAX_FOLDED_COUNTS
    layer_mod.MAX_FOLDED_COUNTS = cap if on else 0
    try:
        yield
    finally:
        layer_mod.MAX_FOLDED_COUNTS = cap


@contextmanager
def counted_all_to_alls() -> Iterator[list]:
    """Inside the block, every ``dist.all_to_all_single`` call appends to the yielded list."""
    calls: list = []
    a2a = dist.all_to_all_single

    def counting(*args, **kwargs):
        calls.append(1)
        return a2a(*args, **kwargs)

    dist.all_to_all_single = counting
    try:
        yield calls
    finally:
        dist.all_to_all_single = a2a


def layer_results(layer: MoELayer, out, x: torch.Tensor) -> dict:
    """What the oracle comparisons read after one forward (``out``) and backward of ``layer`` on ``x``."""
    return {
        "hidden": out.hidden.detach().reshape_as(x),
        "aux": out.aux_loss.detach(),
        "terms": {k: v.detach() for k, v in out.terms.items()},
        "f": out.stats.f,
        "P": out.stats.P,
        "counts": out.stats.tokens_per_expert,
        "dropped": int(out.stats.dropped),
        "wire_rows": out.stats.wire_rows,
        "grad_x": x.grad,
        "grad_router": layer.router.weight.grad,
        "grad_w1": layer.experts.w1.grad,
        "grad_w2": layer.experts.w2.grad,
    }


def fp32_run(case: Case, t: dict) -> tuple[dict[str, torch.Tensor], bool]:
    """One fp32 process (no group): forward + backward of <h, cot> + aux on rank 0's tokens. Returns the
    output and every gradient (the shared experts' and their gate's where the case has them), and whether
    the experts took F.grouped_mm (read through the module, so a monkeypatched ``grouped_mm_ok`` counts)."""
    layer = MoELayer(MoEConfig(**case.cfg))
    shared = layer.shared_experts
    with torch.no_grad():
        layer.router.weight.copy_(t["router"])
        layer.experts.w1.copy_(t["w1"])
        layer.experts.w2.copy_(t["w2"])
        if shared is not None:
            shared.w1.copy_(t["ws1"])
            shared.w2.copy_(t["ws2"])
            if shared.gate is not None:
                shared.gate.copy_(t["wg"])
    x = t["xs"][0].float().requires_grad_()
    out = layer(x)
    ((out.hidden * t["cot"][0].float()).sum() + out.aux_loss).backward()
    got = {
        "hidden": out.hidden.detach(),
        "grad_x": x.grad,
        "grad_w1": layer.experts.w1.grad,
        "grad_w2": layer.experts.w2.grad,
        "grad_router": layer.router.weight.grad,
    }
    if shared is not None:
        got.update(grad_ws1=shared.w1.grad, grad_ws2=shared.w2.grad)
        if shared.gate is not None:
            got["grad_wg"] = shared.gate.grad
    return got, moe_experts.grouped_mm_ok(x, layer.experts.w1)


def folded_counts_worker(rank: int, world: int, case: Case) -> dict:
    """The same forward+backward with the dispatch counts folded into the statistics all-reduce and with
    the count all-to-all: all-to-all calls per forward, and every result."""
    group = dist.group.WORLD
    t = make_tensors(case)
    out: dict = {}
    for fold in (True, False):
        with count_folding(fold):
            layer = build_layer(case, t, rank, world, group)
        x = t["xs"][rank].clone().requires_grad_()
        with counted_all_to_alls() as calls:
            res = layer(x)
            forward_calls = len(calls)
            ((res.hidden * t["cot"][rank]).sum() + res.aux_loss).backward()
        out[fold] = {
            "forward_a2a": forward_calls,
            "hidden": res.hidden.detach(),
            "grads": [x.grad, layer.router.weight.grad, layer.experts.w1.grad, layer.experts.w2.grad],
        }
    return out
