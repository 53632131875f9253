"""``engine: fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) beside expert parallelism, as torchtitan
shards dense parameters over its data-parallel mesh and experts over ``efsdp``.

- **Dense parameters** (router included) are fully sharded over the world: one FSDP unit per transformer
  block, then the root (embeddings, final norm, the LM head).
- **Expert parameters** (``MoELayer.experts``, this EP rank's slots) are fully sharded over the
  expert-data-parallel group (``layout.edp_group``: the ranks holding the same experts), one unit per MoE
  layer. With EP equal to the world there is no such group: experts stay unsharded (the log says so) and
  FSDP ignores them.
- Gradients and AdamW state are sharded the same way (DTensors); the reduce-scatter replaces the torch
  engine's all-reduce. The gradient rule is ``moe_dist.moe.sync.sync_gradients``'s: every unit divides its
  reduce-scatter sum by the world size (dense: the mean over the world; experts: the sum over the
  expert-data-parallel group over the world, since an expert's local grad already sums its EP group's
  tokens through the all-to-all backward); unsharded experts are scaled by 1/world in ``step``.
- ``train.bf16`` on CUDA: FSDP2's ``MixedPrecisionPolicy`` (bf16 compute, fp32 reduce and master weights)
  instead of autocast, as ``engine: torch`` ignores bf16 on CPU.

Checkpoints stay in the global format: while this engine is built, ``model.state_dict()`` returns full
tensors (each DTensor's ``full_tensor()``: a collective, so every rank calls it together, as the checkpoint
manager does) and ``model.load_state_dict`` takes full tensors and keeps this rank's shard (no
communication); the AdamW state is gathered and sharded the same way. So a checkpoint of either engine
resumes under the other, at any layout (``reshards``).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from moe_dist.checkpoint.files import CheckpointError
from moe_dist.checkpoint.global_state import join_optimizer
from moe_dist.moe.layer import moe_layers
from moe_dist.moe.parallel import ParallelLayout
from moe_dist.moe.sync import expert_params
from moe_dist.training.config import RunConfig
from moe_dist.training.engine import (
    EngineCheckpoint,
    clipped_step,
    lr_lambda,
    optimizer_checkpoint,
    param_groups,
)

log = logging.getLogger("moe_dist.train")

VIEW_WARNING = r"FSDP2-wrapped module \(.*\) returned a view tensor"


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: the entries of its longest ``nn.ModuleList`` that holds an MoE layer
    (``MoETransformer.blocks``; a transformers model's ``model.layers``). Empty: the root unit only."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and moe_layers(m)]
    return list(max(lists, key=len)) if lists else []


def full(t: Tensor) -> Tensor:
    """A DTensor's full tensor (a collective over its mesh); any other tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(value: Tensor, like: Tensor) -> Tensor:
    """``value`` (a full tensor of ``like``'s global shape) as a DTensor placed as ``like``, holding this
    rank's chunk only (no communication: every rank holds the full value). Other tensors as they are."""
    if not isinstance(like, DTensor) or isinstance(value, DTensor) or value.shape != like.shape:
        return value
    local = value
    for dim, placement in enumerate(like.placements):
        if placement.is_shard():
            n, k = like.device_mesh.size(dim), like.device_mesh.get_local_rank(dim)
            chunks = torch.chunk(local, n, dim=placement.dim)  # FSDP2's split: torch.chunk, empty at the end
            local = chunks[k] if k < len(chunks) else local.narrow(placement.dim, 0, 0)
    return DTensor.from_local(
        local.contiguous(),
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


class _FullOptimizer:
    """The optimizer as ``split_optimizer``/``join_optimizer`` read it: its param groups, and a state_dict
    with every sharded state tensor gathered (collective: every rank calls ``state_dict`` together)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups

    def state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        state = {
            i: {k: full(v) if torch.is_tensor(v) else v for k, v in st.items()}
            for i, st in sd["state"].items()
        }
        return {"state": state, "param_groups": sd["param_groups"]}


class FSDPEngine:
    grad_norm_known = True
    norm_is_global = True
    """One all-reduce of the squared local shards over the world: the same number on every rank."""
    can_skip_step = True
    reshards = True
    replica_sync_s = 0.0
    """Replicated placements are refused (``refuse_for_fsdp``): nothing to sync."""

    def __init__(
        self, model: nn.Module, cfg: RunConfig, layout: ParallelLayout, device: torch.device
    ) -> None:
        self.model, self.cfg, self.layout, self.device = model, cfg, layout, device
        # why: a block's MoEOutput holds views (hidden, stats) that nothing modifies in place; FSDP2 warns
        # about every view a wrapped module returns, once per module and rank
        warnings.filterwarnings("ignore", message=VIEW_WARNING, category=UserWarning)
        world_mesh = DeviceMesh.from_group(layout.world_group, device.type)
        mp = MixedPrecisionPolicy()
        if cfg.train.bf16 and device.type == "cuda":  # as autocast_ctx: bf16 is a CUDA option
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        reshard = cfg.fsdp.reshard_after_forward
        self.expert_units: list[nn.Module] = []
        ignored: set[nn.Parameter] = set()
        if layout.edp_group is not None:
            edp_mesh = DeviceMesh.from_group(layout.edp_group, device.type)
            for m in moe_layers(model):
                fully_shard(m.experts, mesh=edp_mesh, reshard_after_forward=reshard, mp_policy=mp)
                self.expert_units.append(m.experts)
        else:
            ignored = set(expert_params(model))
            if layout.rank == 0 and ignored:
                log.info(
                    "engine fsdp: EP = world (%d): expert parameters stay unsharded (no expert-data-parallel "
                    "group to shard them over); dense parameters are sharded over the world",
                    layout.world,
                )
        self.unsharded_experts = [p for p in expert_params(model) if p in ignored]
        blocks = transformer_blocks(model)
        for b in blocks:
            fully_shard(
                b, mesh=world_mesh, reshard_after_forward=reshard, mp_policy=mp, ignored_params=ignored
            )
        fully_shard(model, mesh=world_mesh, mp_policy=mp, ignored_params=ignored)
        gloo = dist.get_backend(layout.world_group) == "gloo"
        for unit in (m for m in model.modules() if isinstance(m, FSDPModule)):
            # why world for every unit: dense grads are the mean over the world, experts' the sum over their
            # expert-data-parallel group divided by the world (sync_gradients' rule)
            unit.set_gradient_divide_factor(float(layout.world))
            # why: gloo has neither AVG nor PREMUL_SUM; sum, then divide (exact in fp64 for powers of two)
            unit.set_force_sum_reduction_for_comms(gloo)
            if hasattr(unit, "set_reduce_scatter_unused_params"):
                # why: a unit whose params got no grad on one rank must still join the reduce-scatter
                unit.set_reduce_scatter_unused_params(True, recurse=False)
        for i, b in enumerate(blocks):
            # why: a block gathers its experts as it starts (the all-gather leaves the profiler's expert
            # range) and the next block's dense params while it computes
            ahead = [m.experts for m in moe_layers(b) if m.experts in self.expert_units]
            b.set_modules_to_forward_prefetch([*ahead, *blocks[i + 1 : i + 2]])
        model.register_state_dict_post_hook(_full_state_dict)
        model.register_load_state_dict_pre_hook(_shard_state_dict)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.micro = 0
        """Backward passes since the last optimizer step."""

    def forward(self, idx: Tensor):
        return self.model(idx)  # mixed precision, if any, is FSDP's policy (no autocast)

    def backward(self, loss: Tensor) -> None:
        accum = self.cfg.train.grad_accum
        self.micro += 1
        # why reduce on every micro-batch under on_nonfinite=skip: a skipped step drops the grads with
        # model.zero_grad(), which reaches reduced (sharded) grads but not FSDP's unreduced ones
        sync = self.micro >= accum or self.cfg.train.on_nonfinite == "skip"
        self.model.set_requires_gradient_sync(sync)
        (loss / accum).backward()

    def step(self) -> float:
        """Scale the unsharded experts' grads, clip, update. Returns the global grad norm before clipping;
        a non-finite one updates nothing (weights, AdamW state, scheduler), as ``TorchEngine.step``."""
        self.micro = 0
        for p in self.model.parameters():
            if p.grad is None and p.requires_grad:  # as sync_gradients: every param steps (AdamW decays)
                p.grad = torch.zeros_like(p)
        for p in self.unsharded_experts:
            p.grad.mul_(1.0 / self.layout.world)  # no FSDP reduction: the rule's 1/world here
        return clipped_step(self, self.grads(), self._global_norm())

    def grads(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.grad is not None]

    def _global_norm(self) -> float:
        # why one all-reduce over the world: every element of every grad sits in exactly one rank's local
        # shard (dense over the world, experts over their expert-data-parallel group, unsharded experts on
        # their one EP rank), so the sum of the ranks' local squares is the global square norm
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.grads():
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            sq += g.pow(2).sum(dtype=torch.float64)
        if self.layout.world > 1:
            dist.all_reduce(sq, group=self.layout.world_group)
        return float(torch.sqrt(sq))

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def checkpoint_state(self) -> EngineCheckpoint:
        """AdamW state gathered to full tensors and split by name, as ``TorchEngine.checkpoint_state``."""
        return optimizer_checkpoint(self.model, _FullOptimizer(self.optimizer), self.scheduler)

    def load_checkpoint_state(
        self, dense: dict[str, Any], experts_opt: dict[str, Any], own: dict[str, Any]
    ) -> None:
        # why the optimizer itself: join_optimizer reads only its param groups (no state to gather)
        opt = join_optimizer(
            self.model, self.optimizer, dense["optimizer"], experts_opt, dense["param_groups"]
        )
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        opt["state"] = {
            i: {k: shard_like(v, params[i]) if torch.is_tensor(v) else v for k, v in st.items()}
            for i, st in opt["state"].items()
        }
        self.optimizer.load_state_dict(opt)
        self.scheduler.load_state_dict(dense["scheduler"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise CheckpointError(
            "engine=fsdp resumes format-2 checkpoints only (per-expert files); resume this one with "
            "engine=torch at its own layout, save, then switch"
        )

    def checkpoint_globals(self) -> list[type]:
        return []


def _full_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``model.state_dict()`` post-hook: every DTensor as its full tensor (collective, in key order)."""
    for k, v in state_dict.items():
        if isinstance(v, DTensor):
            state_dict[k] = v.full_tensor()


def _shard_state_dict(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """``model.load_state_dict`` pre-hook: each full tensor for a sharded parameter becomes this rank's
    shard of it (no communication); FSDP units are resharded first, so no stale gathered copy survives."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    for name, p in module.named_parameters():
        key = prefix + name
        if key in state_dict and torch.is_tensor(state_dict[key]):
            state_dict[key] = shard_like(state_dict[key], p)
