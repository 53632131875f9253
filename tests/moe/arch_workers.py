"""Rank-side body for the architecture tests (gated experts, shared experts, group-limited routing, the
sequence-wise loss); runs in-process for one rank or under tests.helpers.launch.run_ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.helpers.oracle import Case, make_tensors
from tests.helpers.workers import build_layer, layer_results


def arch_case_worker(rank: int, world: int, cases: list[Case]) -> list[dict]:
    """Forward + backward of <h, cot> + aux on this rank's tokens, for every case; [B, S, D] input when the
    case has a seq_len (the layer's sequence axis), else [T, D]."""
    group = dist.group.WORLD if world > 1 else None
    results = []
    for case in cases:
        t = make_tensors(case)
        layer = build_layer(case, t, rank, world, group)
        shared = layer.shared_experts
        if shared is not None:
            with torch.no_grad():
                shared.w1.copy_(t["ws1"])
                shared.w2.copy_(t["ws2"])
                if shared.gate is not None:
                    shared.gate.copy_(t["wg"])
        x = t["xs"][rank].clone().requires_grad_()
        # an explicit B (not -1): a rank may have 0 rows
        x_in = x.view(x.shape[0] // case.seq_len, case.seq_len, x.shape[-1]) if case.seq_len else x
        out = layer(x_in)
        assert out.hidden.shape == x_in.shape
        loss = (out.hidden.reshape_as(x) * t["cot"][rank]).sum() + out.aux_loss
        loss.backward()
        res = layer_results(layer, out, x)
        if shared is not None:
            res["grad_ws1"] = shared.w1.grad
            res["grad_ws2"] = shared.w2.grad
            res["grad_wg"] = shared.gate.grad if shared.gate is not None else None
        results.append(res)
    return results


class _EventLog:
    """A timing hook that only lists the events it is given, in order."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def record(self, layer: int, phase: str, event: str) -> None:
        self.events.append(f"{phase}:{event}")

    def tokens(self, layer: int, n: int) -> None:
        pass

    def expert_delay(self, layer: int) -> None:
        pass


def pair_list_worker(rank: int, world: int, cfg: dict, tokens: list[int]) -> dict:
    """fp32 dedup layer with shared experts, forward + backward on this rank's tokens three times: the pair
    lists in the gates' fp32 (the default), forced to fp64, and fp32 with overlap_shared. Returns each run's
    output, grads, wire bytes and the timing events in order, the shared experts' weight gradients logged
    when they are accumulated."""
    import moe_dist.moe.dedup as dedup
    from moe_dist import MoEConfig, MoELayer

    group = dist.group.WORLD
    x = torch.randn(tokens[rank], cfg["d_model"], generator=torch.Generator().manual_seed(rank))
    fp64 = lambda g, t: torch.float64  # noqa: E731
    runs = {}
    for name, dtype_rule, overlap in (
        ("fp32", dedup.pair_list_dtype, False),
        ("fp64", fp64, False),
        ("fp32-overlap", dedup.pair_list_dtype, True),
    ):
        torch.manual_seed(0)
        log = _EventLog()
        layer = MoELayer(MoEConfig(**cfg, overlap_shared=overlap), group, group, timing_hook=log)
        for w in ("w1", "w2"):
            getattr(layer.shared_experts, w).register_post_accumulate_grad_hook(
                lambda p, w=w, log=log: log.events.append(f"bwd:shared_{w}_grad")
            )
        saved, dedup.pair_list_dtype = dedup.pair_list_dtype, dtype_rule
        try:
            xi = x.clone().requires_grad_()
            out = layer(xi)
            (out.hidden.square().sum() + out.aux_loss).backward()
        finally:
            dedup.pair_list_dtype = saved
        runs[name] = {
            "tensors": [out.hidden.detach(), xi.grad] + [p.grad for p in layer.parameters()],
            "wire_bytes": out.stats.wire_bytes,
            "wire_rows": out.stats.wire_rows,
            "events": log.events,
        }
    return runs
