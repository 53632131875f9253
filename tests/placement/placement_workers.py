"""Rank-side bodies for the placement tests (run under tests.helpers.launch.run_ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_dist import MoEConfig, MoELayer
from moe_dist.errors import ConfigError
from moe_dist.moe.placement import Placement
from tests.helpers.oracle import Case, make_tensors
from tests.helpers.workers import count_folding, counted_all_to_alls, layer_results


def build(
    case: Case, t: dict, ep_group, balance_group, placement: Placement | None, seed: int = 0
) -> MoELayer:
    """An fp64 layer whose router, bias and slots hold the case's weights (slot s: its logical expert's)."""
    layer = MoELayer(
        MoEConfig(**case.cfg), ep_group, balance_group, init_seed=seed, placement=placement
    ).double()
    with torch.no_grad():
        layer.router.weight.copy_(t["router"])
        layer.router.expert_bias.copy_(t["bias"])
        layer.experts.w1.copy_(t["w1"][layer.slot_experts])
        layer.experts.w2.copy_(t["w2"][layer.slot_experts])
    return layer


def launch_worker(
    rank: int, world: int, cases: list[Case], contiguous: Case | None = None, sync: tuple | None = None
) -> dict:
    """One launch per world size runs several tests' bodies (each launch costs every rank a start-up):
    ``oracle_case_worker`` on ``cases``, ``contiguous_worker`` on ``contiguous``, and
    ``replica_sync_worker`` on the arguments ``sync`` (each None: skipped)."""
    return {
        "cases": oracle_case_worker(rank, world, cases),
        "contiguous": contiguous_worker(rank, world, contiguous) if contiguous is not None else None,
        "sync": replica_sync_worker(rank, world, *sync) if sync is not None else None,
    }


def oracle_case_worker(rank: int, world: int, cases: list[Case]) -> list[dict]:
    """Forward + backward of <h, cot> + aux for every case, with the case's placement (``extra``) and the
    dispatch counts folded into the statistics all-reduce or sent by their own all-to-all (``fold``)."""

    group = dist.group.WORLD
    results = []
    for case in cases:
        t = make_tensors(case)
        with count_folding(case.extra["fold"]):
            layer = build(case, t, group, group, Placement.from_dict(case.extra["placement"]))
        x = t["xs"][rank].clone().requires_grad_()
        with counted_all_to_alls() as calls:
            out = layer(x)
            forward_a2a = len(calls)
            ((out.hidden * t["cot"][rank]).sum() + out.aux_loss).backward()
        results.append(
            {**layer_results(layer, out, x), "slot_experts": layer.slot_experts, "forward_a2a": forward_a2a}
        )
    return results


def contiguous_worker(rank: int, world: int, case: Case) -> dict:
    """A layer built with ``Placement.contiguous(N, R)`` and one built without a placement, same seed:
    their outputs and every gradient, for a bitwise comparison."""
    group = dist.group.WORLD
    out = {}
    for name, placement in (
        ("none", None),
        ("contiguous", Placement.contiguous(case.cfg["num_experts"], world)),
    ):
        torch.manual_seed(0)
        layer = MoELayer(MoEConfig(**case.cfg), group, group, init_seed=3, placement=placement)
        x = make_tensors(case)["xs"][rank].float().requires_grad_()
        res = layer(x)
        (res.hidden.pow(2).sum() + res.aux_loss).backward()
        out[name] = [res.hidden.detach(), x.grad] + [p.grad for p in layer.parameters()]
    return out


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def replica_sync_worker(
    rank: int, world: int, case: Case, layouts: list[tuple[int, dict]], steps: int
) -> dict:
    """For each (EP size, placement): broadcast_parameters repairs a disturbed replica; ``steps`` steps of
    backward, sync_gradients and AdamW; the synced grads of the first step; then every rank's slots and
    their AdamW state after the last step (gathered, for bitwise replica checks); the per-expert checkpoint
    written by each rank, and a fresh layer loaded from it; DeepSpeed's refusal."""
    from moe_dist.checkpoint.global_state import join_model, join_optimizer, split_model, split_optimizer
    from moe_dist.moe.parallel import ParallelLayout
    from moe_dist.moe.sync import broadcast_parameters, owned_expert_grads, sync_gradients
    from moe_dist.training.deepspeed_engine import DeepSpeedEngine

    t = make_tensors(case)
    results = []
    for ep, placement_dict in layouts:
        layout = ParallelLayout.build(ep)
        placement = Placement.from_dict(placement_dict)
        layer = build(case, t, layout.ep_group, layout.balance_group, placement)
        res: dict = {
            "ep_rank": layout.ep_rank,
            "slot_experts": layer.slot_experts,
            "owned": layer.owned_slots,
        }
        # a disturbed replica (not the first of its expert) must be repaired from the first one
        with torch.no_grad():
            for s in range(len(layer.slot_experts)):
                if s not in layer.owned_slots:
                    layer.experts.w1[s] += 1.0 + rank
        broadcast_parameters(layer, layout.world_group, layout.edp_group)
        res["w1_after_broadcast"] = layer.experts.w1.detach().clone()
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
        sync_s = []
        for step in range(steps):
            x = t["xs"][rank] * (1.0 + 0.5 * step)
            out = layer(x)
            ((out.hidden * t["cot"][rank]).sum() + out.aux_loss).backward()
            sync_s.append(sync_gradients(layer, layout.world_group, layout.edp_group))
            if step == 0:
                # the grad norm's expert part: each expert once over the EP group (a rank may own none)
                res["owned_sq"] = sum(float(g.square().sum()) for g in owned_expert_grads(layer))
                res["grad_w1"] = layer.experts.w1.grad.clone()
                res["grad_w2"] = layer.experts.w2.grad.clone()
                res["grad_router"] = layer.router.weight.grad.clone()
            opt.step()
            opt.zero_grad(set_to_none=True)
        res["sync_s"] = sync_s
        state = [opt.state[p] for p in (layer.experts.w1, layer.experts.w2)]
        res["slots"] = {
            "w1": layer.experts.w1.detach().clone(),
            "w2": layer.experts.w2.detach().clone(),
            "exp_avg": [st["exp_avg"].clone() for st in state],
            "exp_avg_sq": [st["exp_avg_sq"].clone() for st in state],
        }
        # the per-expert checkpoint: each rank's keys; a fresh layer (other init) loaded from all of them
        dense, experts = split_model(layer)
        d_opt, e_opt, groups = split_optimizer(layer, opt)
        res["written_keys"] = sorted(experts)
        all_experts, all_opt = {}, {}
        for ex, eo in _gather((experts, e_opt)):
            all_experts.update(ex)
            all_opt.update(eo)
        fresh = MoELayer(
            MoEConfig(**case.cfg), layout.ep_group, layout.balance_group, init_seed=99, placement=placement
        ).double()
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
        fresh.load_state_dict(join_model(fresh, dense, all_experts))
        fresh_opt.load_state_dict(join_optimizer(fresh, fresh_opt, d_opt, all_opt, groups))
        res["reload_equal"] = all(
            torch.equal(a, b)
            for a, b in zip(layer.state_dict().values(), fresh.state_dict().values(), strict=True)
        ) and all(
            all(
                torch.equal(opt.state[p][k], fresh_opt.state[q][k])
                if torch.is_tensor(opt.state[p][k])
                else opt.state[p][k] == fresh_opt.state[q][k]
                for k in ("exp_avg", "exp_avg_sq", "step")
            )
            for p, q in zip(layer.parameters(), fresh.parameters(), strict=True)
        )
        try:
            DeepSpeedEngine(layer, None, layout, torch.device("cpu"))  # type: ignore[arg-type]
            res["deepspeed"] = None
        except ConfigError as e:
            res["deepspeed"] = str(e)
        results.append(res)
    return results
