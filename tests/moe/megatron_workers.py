"""Rank-side body for tests/test_megatron.py: our layer alone. Megatron-Core is called in the parent on what
the ranks return (each rank would otherwise pay its ~4 s import), with its all-reduces given the other
ranks' contributions."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.helpers.oracle import Case, make_tensors
from tests.helpers.workers import build_layer


def megatron_case_worker(rank: int, world: int, cases_by_ep: dict[int, list[Case]], micro: int) -> dict:
    """For each EP size ep (a divisor of ``world``), the ranks split into world/ep groups of ep ranks, each
    running its cases on its own (one spawn covers several EP sizes). Per case, one optimizer step of
    ``micro`` equal micro-batches ([B, S, D] when the case has a seq_len): forward + backward of
    <h, cot> + aux each, then ``update_expert_bias``. Returns {ep: [per case: per micro-batch the router
    logits this rank computed and the layer's loss terms, and the bias before and after the step]}."""
    out = {}
    for ep, cases in cases_by_ep.items():
        if ep == world:
            group = dist.group.WORLD if world > 1 else None
        else:  # every rank creates every subgroup, in the same order (new_group is collective)
            groups = [dist.new_group(list(range(i, i + ep))) for i in range(0, world, ep)]
            group = groups[rank // ep] if ep > 1 else None
        out[ep] = _run_cases(rank % ep, ep, group, cases, micro)
    return out


def _run_cases(rank: int, world: int, group, cases: list[Case], micro: int) -> list[dict]:
    results = []
    for case in cases:
        t = make_tensors(case)
        layer = build_layer(case, t, rank, world, group)
        bias_before = layer.router.expert_bias.clone()
        steps = []
        for x, cot in zip(t["xs"][rank].chunk(micro), t["cot"][rank].chunk(micro), strict=True):
            x_in = x.view(-1, case.seq_len, x.shape[-1]) if case.seq_len else x
            out = layer(x_in)
            ((out.hidden.reshape_as(cot) * cot).sum() + out.aux_loss).backward()
            with torch.no_grad():
                logits_TN = layer.router(x).logits_TN  # the same computation the layer routed with
            steps.append(
                {
                    "logits": logits_TN,
                    "terms": {k: v.detach() for k, v in out.terms.items()},
                    "counts": out.stats.tokens_per_expert,
                }
            )
        window_N = layer.update_expert_bias()
        results.append(
            {
                "steps": steps,
                "window_counts": window_N,
                "bias_before": bias_before,
                "bias_after": layer.router.expert_bias.clone(),
            }
        )
    return results
