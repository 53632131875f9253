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
