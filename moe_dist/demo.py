"""Layer demo: one expert-parallel MoE layer across the ranks of a torchrun launch, on CPU/gloo.

    torchrun --nproc-per-node 2 -m moe_dist.demo

It fits the layer to a fixed random teacher for a few steps and logs loss, aux loss and load per step.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from moe_dist import MoEConfig, MoELayer

log = logging.getLogger("moe_dist.demo")


def main(steps: int = 20, tokens: int = 512) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if backend == "nccl" else None
        torch.manual_seed(0)  # same init everywhere; each rank then holds its own experts
        cfg = MoEConfig(d_model=64, d_ff=256, num_experts=4 * world, top_k=2)
        layer = MoELayer(cfg, ep_group=dist.group.WORLD, balance_group=dist.group.WORLD).to(device)
        opt = torch.optim.AdamW(layer.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(1 + rank)  # why per-rank seed: ranks see different tokens
        teacher = torch.randn(cfg.d_model, cfg.d_model, generator=torch.Generator().manual_seed(7)) * 0.2
        for step in range(steps):
            x = torch.randn(tokens, cfg.d_model, generator=gen).to(device)
            out = layer(x)
            task = ((out.hidden - x @ teacher.to(x.device)) ** 2).mean()
            (task + out.aux_loss).backward()
            # dense (router) grads: mean over ranks; expert grads: each rank owns its experts, whose grad
            # already sums every rank's tokens, so divide by the world size to match the same mean
            for p in layer.router.parameters():
                dist.all_reduce(p.grad)
            for p in layer.parameters():
                p.grad /= world
            opt.step()
            opt.zero_grad()
            layer.update_expert_bias()
            n = out.stats.tokens_per_expert.double()
            if rank == 0:
                log.info(
                    "step %d loss %.4f aux %.4f MaxVio %.2f tokens/expert %s",
                    step,
                    task.item(),
                    out.aux_loss.item(),
                    (n.max() / n.mean() - 1).item(),
                    n.long().tolist(),
                )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
