"""The MoE layer as a library: a complete 2-rank script (any even world works: EP=2 x DP=world/2).

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 launch/layer_example.py

What a script around the layer must do itself (the trainer does the same):
1. seed every rank alike before building: the router and each rank's slice of the experts then come from one
   random stream; ``broadcast_parameters`` makes the replicas equal even when a rank seeded otherwise;
2. after ``backward()``, call ``sync_gradients``: dense grads (router included) become their mean over the
   world, expert grads their sum over the expert-data-parallel group divided by the world;
3. call ``update_expert_bias()`` once per optimizer step.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from moe_dist import MoEConfig, MoELayer, ParallelLayout, broadcast_parameters, sync_gradients

log = logging.getLogger("layer_example")
EP = 2  # experts split over 2 ranks; more ranks add data-parallel replicas of that split


def build_layer(cfg: MoEConfig, layout: ParallelLayout, device: torch.device, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)  # the same seed on every rank, before the layer draws its weights
    layer = MoELayer(cfg, ep_group=layout.ep_group, balance_group=layout.balance_group).to(device)
    # why: a guard for ranks seeded differently (say by rank, for their data); a no-op when seeded alike
    broadcast_parameters(layer, layout.world_group, layout.edp_group)
    return layer


def optimizer_step(
    layer: MoELayer, optimizer: torch.optim.Optimizer, loss: Tensor, layout: ParallelLayout
) -> None:
    loss.backward()
    sync_gradients(layer, layout.world_group, layout.edp_group)  # without it the ranks drift apart
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    layer.update_expert_bias()


def check_router_replicated(layer: MoELayer, layout: ParallelLayout) -> None:
    gathered = [torch.empty_like(layer.router.weight) for _ in range(layout.world)]
    dist.all_gather(gathered, layer.router.weight.detach())
    if not all(torch.equal(gathered[0], w) for w in gathered):
        raise RuntimeError("router weights differ across ranks: was sync_gradients called?")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    layout = ParallelLayout.build(ep=EP)  # the EP groups, the expert-data-parallel groups, the world
    cfg = MoEConfig(d_model=256, d_ff=1024, num_experts=8, top_k=2, aux_loss_coef=1e-2)
    layer = build_layer(cfg, layout, device)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(1000 + layout.rank)  # each rank its own tokens
    for step in range(3):
        x_TD = torch.randn(64, cfg.d_model, generator=data).to(device)
        out = layer(x_TD)
        loss = F.mse_loss(out.hidden, x_TD.flip(-1)) + out.aux_loss  # a toy regression target
        optimizer_step(layer, optimizer, loss, layout)
        log.info("rank %d step %d loss %.4f", layout.rank, step, float(loss.detach()))
    check_router_replicated(layer, layout)  # every rank must now hold the same router


if __name__ == "__main__":
    main()
