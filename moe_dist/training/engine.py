"""Engines behind one trainer: plain torch.distributed (``engine: torch``, under torchrun), FSDP2 beside
expert parallelism (``engine: fsdp``, under torchrun; training/fsdp_engine.py) and DeepSpeed
(``engine: deepspeed``, under the deepspeed launcher).

Gradient semantics (both engines): the objective is the mean over all ranks of each rank's loss; the
rule is ``moe_dist.moe.sync.sync_gradients`` (public, so library users apply the same one). DeepSpeed's
engine does the same (``_reduce_expert_gradients`` divides the expert-data-parallel sum by the
data-parallel world size).

The trainer sees an engine only through the ``Engine`` protocol below; ``build_engine`` picks the class by
``engine:`` from ``ENGINES``. A new engine is one class behind the protocol and one row in the table.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_dist.checkpoint.global_state import join_optimizer, split_optimizer
from moe_dist.moe.parallel import ParallelLayout
from moe_dist.moe.sync import dense_params, expert_params, owned_expert_grads, sync_gradients
from moe_dist.training.config import RunConfig


def lr_lambda(cfg: RunConfig):
    """Linear warmup to 1, then cosine to min_lr/lr at the last step (a multiplier of optim.lr)."""
    o, steps = cfg.optim, cfg.train.steps
    floor = o.min_lr / o.lr

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        t = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def autocast_ctx(cfg: RunConfig, device: torch.device):
    if device.type == "cuda" and cfg.train.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class EngineCheckpoint:
    """The parts of a checkpoint an engine contributes, by file (format 2, ``moe_dist.checkpoint.files``)."""

    dense: dict[str, Any] = field(default_factory=dict)
    """Merged into dense.pt (rank 0)."""
    experts: dict[str, Any] = field(default_factory=dict)
    """Merged into this EP rank's experts file (its first replica writes it)."""
    own: dict[str, Any] = field(default_factory=dict)
    """Merged into this rank's rank file."""


def clipped_step(engine: Any, params: list[nn.Parameter], norm: float) -> float:
    """Clip ``params``' grads to ``optim.grad_clip`` by the global ``norm``, then step the engine's optimizer
    and scheduler; a non-finite norm updates nothing (the grads are dropped). Returns ``norm``."""
    if not math.isfinite(norm):
        engine.optimizer.zero_grad(set_to_none=True)
        return norm
    clip = engine.cfg.optim.grad_clip
    if clip > 0 and norm > clip:
        for p in params:
            p.grad.mul_(clip / (norm + 1e-6))
    engine.optimizer.step()
    engine.optimizer.zero_grad(set_to_none=True)
    engine.scheduler.step()
    return norm


def optimizer_checkpoint(model: nn.Module, optimizer: Any, scheduler: Any) -> EngineCheckpoint:
    """AdamW state split by parameter name: dense in dense.pt, each expert's by id in its experts file (the
    layout-independent format; ``optimizer`` is anything with the torch optimizer's ``state_dict``)."""
    d_opt, e_opt, groups = split_optimizer(model, optimizer)
    dense = {"optimizer": d_opt, "param_groups": groups, "scheduler": scheduler.state_dict()}
    return EngineCheckpoint(dense=dense, experts={"optimizer": e_opt})


class Engine(Protocol):
    """What the trainer and the checkpoint manager need from an engine; it owns optimizer and scheduler."""

    optimizer: torch.optim.Optimizer
    grad_norm_known: bool
    """Whether the last ``step`` measured a grad norm (only then is a NaN one non-finite)."""
    norm_is_global: bool
    """Whether ``step``'s norm is the same number on every rank already (else the trainer agrees on it)."""
    can_skip_step: bool
    """Whether a step with non-finite values can be dropped before anything is updated."""
    reshards: bool
    """Whether its checkpoints load at another layout (and rebuild the stored expert placements)."""
    replica_sync_s: float
    """Seconds the last step spent summing replicated experts' grads (0 without replicas)."""

    def forward(self, idx: Tensor) -> Any: ...

    def backward(self, loss: Tensor) -> None: ...

    def step(self) -> float:
        """Update; the global grad norm before clipping."""
        ...

    @property
    def lr(self) -> float: ...

    def checkpoint_state(self) -> EngineCheckpoint: ...

    def load_checkpoint_state(
        self, dense: dict[str, Any], experts_opt: dict[str, Any], own: dict[str, Any]
    ) -> None:
        """Restore from a format-2 checkpoint: its dense.pt, the expert optimizer state this rank's
        experts files hold (by expert id), and its rank file."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a format-1 rank file's ``engine`` entry (the layout that wrote it)."""
        ...

    def checkpoint_globals(self) -> list[type]:
        """The non-container types its rank files may hold (allowlisted when they are read)."""
        ...


ENGINES: dict[str, tuple[str, str]] = {
    "torch": ("moe_dist.training.engine", "TorchEngine"),
    "deepspeed": ("moe_dist.training.deepspeed_engine", "DeepSpeedEngine"),  # imported only when named
    "fsdp": ("moe_dist.training.fsdp_engine", "FSDPEngine"),
}
"""``engine:`` -> (module, class)."""


def build_engine(model: nn.Module, cfg: RunConfig, layout: ParallelLayout, device: torch.device) -> Engine:
    module, name = ENGINES[cfg.engine]
    return getattr(importlib.import_module(module), name)(model, cfg, layout, device)


class TorchEngine:
    grad_norm_known = True
    """``step`` always measures the global grad norm (DeepSpeed's engine may not report one)."""
    norm_is_global = True
    """The norm is the same number on every rank (see ``step``): no agreement needed."""
    can_skip_step = True
    reshards = True

    def __init__(
        self, model: nn.Module, cfg: RunConfig, layout: ParallelLayout, device: torch.device
    ) -> None:
        self.model, self.cfg, self.layout, self.device = model, cfg, layout, device
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.dense = dense_params(model)
        self.experts = expert_params(model)
        self.replica_sync_s = 0.0
        """Seconds the last ``sync_grads`` spent summing replicated experts' grads (0 without replicas)."""

    def forward(self, idx: Tensor):
        with autocast_ctx(self.cfg, self.device):
            return self.model(idx)

    def backward(self, loss: Tensor) -> None:
        # micro-batch losses are averaged over the step, like DeepSpeed's gradient-accumulation scaling
        (loss / self.cfg.train.grad_accum).backward()

    def step(self) -> float:
        """Sync grads, clip, update. Returns the global grad norm before clipping.

        A non-finite norm updates nothing (weights, AdamW moments and step count, scheduler): the grads are
        dropped and the norm returned for the trainer's ``train.on_nonfinite`` decision. Every rank takes
        the same branch: the norm is the same number everywhere (dense grads were all-reduced over the
        world, expert grads over their EP-data-parallel group, and their squares over the EP group, so a
        NaN/Inf on any rank reaches every rank's norm with no extra collective).
        """
        self.sync_grads()
        return clipped_step(self, self.dense + self.experts, self._global_norm())

    def sync_grads(self) -> None:
        """The one gradient rule, shared with library users: see ``moe_dist.moe.sync.sync_gradients``."""
        self.replica_sync_s = sync_gradients(self.model, self.layout.world_group, self.layout.edp_group)

    def _global_norm(self) -> float:
        # why fp64 accumulation: the norm decides clipping; it must not depend on summation order noise
        def sq(grads: list[Tensor]) -> Tensor:
            return sum(
                (g.pow(2).sum(dtype=torch.float64) for g in grads),
                torch.zeros((), dtype=torch.float64, device=self.device),
            )

        # why owned slots only: a replicated expert's grad sits in each of its replicas; it counts once
        dense_sq, expert_sq = sq([p.grad for p in self.dense]), sq(owned_expert_grads(self.model))
        if self.layout.ep_group is not None:
            # why: each EP rank holds different experts; dense grads are already identical everywhere
            dist.all_reduce(expert_sq, group=self.layout.ep_group)
        return float(torch.sqrt(dense_sq + expert_sq))

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def checkpoint_state(self) -> EngineCheckpoint:
        return optimizer_checkpoint(self.model, self.optimizer, self.scheduler)

    def load_checkpoint_state(
        self, dense: dict[str, Any], experts_opt: dict[str, Any], own: dict[str, Any]
    ) -> None:
        opt = join_optimizer(
            self.model, self.optimizer, dense["optimizer"], experts_opt, dense["param_groups"]
        )
        self.optimizer.load_state_dict(opt)
        self.scheduler.load_state_dict(dense["scheduler"])

    def checkpoint_globals(self) -> list[type]:
        return []
