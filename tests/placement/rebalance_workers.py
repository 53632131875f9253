"""Rank-side bodies for the migration tests (run under tests.helpers.launch.run_ranks).

Shape legend: N logical experts, R EP ranks, S slots per rank.
"""

from __future__ import annotations

import random

import torch
import torch.distributed as dist
from torch import nn

from moe_dist.moe.placement import Placement
from moe_dist.placement.migrate import migrate, migrate_layers
from moe_dist.placement.rebalance import balanced_placement


def random_placement(rng: random.Random, N: int, R: int, S: int, version: int = 0) -> Placement:
    """Every expert once on a random rank (N / R each), the redundant slots random experts the rank lacks,
    slots shuffled within each rank."""
    order = list(range(N))
    rng.shuffle(order)
    L = N // R
    rows = [order[r * L : (r + 1) * L] for r in range(R)]
    for row in rows:
        row += rng.sample([e for e in range(N) if e not in row], S - L)
        rng.shuffle(row)
    return Placement(N, tuple(tuple(r) for r in rows), version)


def logical_table(seed: int, N: int) -> dict[str, torch.Tensor]:
    """Per logical expert tensors of two dtypes, with -0.0 and NaN in them (a byte copy must keep them)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, 3, 5, dtype=torch.float64, generator=g)
    b = torch.randn(N, 7, dtype=torch.float32, generator=g)
    a[:, 0, 0], b[:, 0] = -0.0, float("nan")
    return {"a": a, "b": b}


def migration_cases(world: int) -> list[dict]:
    """(old, new) pairs, seeded: random pairs with and without redundant slots, a table with the same
    contents per rank in another slot order (local copies only), and the same table (a no-op)."""
    rng = random.Random(1000 + world)
    N = 8
    cases = []
    for red in (0, 1, 2):
        S = N // world + red
        for k in range(3):
            cases.append(
                {
                    "name": f"random-red{red}-{k}",
                    "old": random_placement(rng, N, world, S),
                    "new": random_placement(rng, N, world, S, version=1),
                }
            )
    old = random_placement(rng, N, world, N // world + 1)
    rows = [list(r) for r in old.slot_expert_RL]
    for row in rows:
        row.reverse()
    cases.append({"name": "reorder", "old": old, "new": Placement(N, tuple(tuple(r) for r in rows), 1)})
    cases.append({"name": "no-op", "old": old, "new": Placement(N, old.slot_expert_RL, 1)})
    return cases


def migrate_worker(rank: int, world: int, seed: int) -> dict:
    """Stack the logical table per the old placement, migrate, return the new stacks and the byte counts;
    and the balanced placement this process computes for a seeded count matrix (every rank must agree)."""
    group = dist.group.WORLD
    out = []
    for case in migration_cases(world):
        old, new = case["old"], case["new"]
        table = logical_table(seed, old.num_experts)
        idx = torch.tensor(old.slot_expert_RL[rank])
        mine = {k: v.index_select(0, idx) for k, v in table.items()}
        moved, stats = migrate(mine, old, new, group)
        out.append(
            {
                "name": case["name"],
                "tensors": moved,
                "bytes_sent": stats.bytes_sent,
                "bytes_received": stats.bytes_received,
                "bytes_total": stats.bytes_total,
                "slots_changed": stats.slots_changed,
            }
        )
    crng = random.Random(seed)
    counts = [[float(int(crng.paretovariate(1.3) * 10)) for _ in range(8)] for _ in range(world)]
    balanced = balanced_placement(counts, world, 8 // world + 1).to_dict()
    return {"cases": out, "balanced": balanced}


class SlotExperts(nn.Module):
    """Stand-in for the layer's experts: every parameter stacked over S slots (two dtypes)."""

    def __init__(self, S: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(S, 4, 8, dtype=torch.float32))
        self.w2 = nn.Parameter(torch.zeros(S, 8, 4, dtype=torch.float64))


class FakeLayer(nn.Module):
    """The protocol ``migrate_layers`` assumes: ``experts``, ``placement``, ``set_placement``."""

    def __init__(self, placement: Placement) -> None:
        super().__init__()
        self.placement = placement
        self.experts = SlotExperts(placement.slots_per_rank)

    def set_placement(self, placement: Placement) -> None:
        self.placement = placement


def expert_values(seed: int, N: int) -> dict[str, torch.Tensor]:
    """Weights and gradients per logical expert: every replica of an expert gets the same ones."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(N, 4, 8, generator=g),
        "w2": torch.randn(N, 8, 4, dtype=torch.float64, generator=g),
        "g1": torch.randn(N, 4, 8, generator=g),
        "g2": torch.randn(N, 8, 4, dtype=torch.float64, generator=g),
    }


def snapshot(layer: FakeLayer, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("w1", "w2"):
        p = getattr(layer.experts, name)
        out[name] = p.detach().clone()
        for k in ("exp_avg", "exp_avg_sq", "step"):
            out[f"{name}.{k}"] = opt.state[p][k].clone()
    return out


def adamw_worker(rank: int, world: int, seed: int) -> dict:
    """Two fake layers with AdamW after one step; migrate both (one all-to-all); return the state before
    and after, and whether the optimizer still holds the same Parameter and state objects."""
    rng = random.Random(seed)
    N = 8
    S = N // world + 1
    olds = [random_placement(rng, N, world, S) for _ in range(2)]
    news = [random_placement(rng, N, world, S, version=1) for _ in range(2)]
    layers = [FakeLayer(p) for p in olds]
    params = [p for layer in layers for p in layer.experts.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for li, layer in enumerate(layers):
        vals = expert_values(seed + li, N)
        idx = torch.tensor(layer.placement.slot_expert_RL[rank])
        with torch.no_grad():
            layer.experts.w1.copy_(vals["w1"][idx])
            layer.experts.w2.copy_(vals["w2"][idx])
        layer.experts.w1.grad = vals["g1"][idx].clone()
        layer.experts.w2.grad = vals["g2"][idx].clone()
    opt.step()
    opt.zero_grad(set_to_none=True)
    before = [snapshot(layer, opt) for layer in layers]
    ptrs = [(id(p), opt.state[p]["exp_avg"].data_ptr()) for p in params]
    stats = migrate_layers(layers, news, opt, dist.group.WORLD)
    after = [snapshot(layer, opt) for layer in layers]
    kept = opt.param_groups[0]["params"]
    same_objects = all(a is b for a, b in zip(kept, params, strict=True)) and ptrs == [
        (id(p), opt.state[p]["exp_avg"].data_ptr()) for p in params
    ]
    return {
        "olds": [p.to_dict() for p in olds],
        "news": [p.to_dict() for p in news],
        "before": before,
        "after": after,
        "placements": [layer.placement.to_dict() for layer in layers],
        "same_objects": same_objects,
        "bytes_total": stats.bytes_total,
        "seconds": stats.seconds,
    }


def rebalance_worker(rank: int, world: int, seed: int) -> dict:
    """Both bodies in one launch (spawning ranks is most of a test's time on this machine)."""
    return {"migrate": migrate_worker(rank, world, seed), "adamw": adamw_worker(rank, world, seed)}
