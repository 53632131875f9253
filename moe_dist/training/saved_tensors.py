"""The measured activation peak (summary.json's ``memory_per_rank.activations_peak``): bytes saved for
backward, counted as autograd saves and frees them. The planner's estimate (moe_dist/training/memory.py) is
checked against it."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

R = TypeVar("R")


class _Saved:
    """What autograd holds for one saved tensor; its release (the graph freed by backward) is counted."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor: torch.Tensor, meter: SavedTensorsPeak, key: int | None) -> None:
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self) -> None:
        if self.key is not None:
            self.meter.release(self.key)


class SavedTensorsPeak:
    """The measured activation peak of a rank: the most bytes that autograd held saved for backward at
    once, counted with ``torch.autograd.graph.saved_tensors_hooks`` while the trainer's steps run. Each
    storage counts once however many saved tensors view it (by ``data_ptr``), and the parameters (and
    views of them) not at all: they are ``params``. Under gradient accumulation each micro-batch's graph is
    freed by its backward, so this is one micro-batch's forward (the loss included), as the planner's
    ``activations_per_micro_batch`` estimates. It is a count, not an allocator reading, so the same on every
    device and unaffected by what else runs on a shared machine; it leaves out the forward's transient
    temporaries and the backward's own buffers (CUDA's ``peak_allocated`` shows those)."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._held: dict[int, list[int]] = {}
        """storage data_ptr -> [saved tensors holding it, its bytes]"""
        self._params: set[int] = set()

    def _pack(self, t: torch.Tensor) -> _Saved:
        base = t._base if t._base is not None else t
        if isinstance(t, nn.Parameter) or isinstance(base, nn.Parameter):
            return _Saved(t, self, None)
        try:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor subclass without one storage
            key, nbytes = id(t), t.numel() * t.element_size()
        if key in self._params:
            return _Saved(t, self, None)
        held = self._held.get(key)
        if held is None:
            self._held[key] = [1, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        else:
            held[0] += 1
        return _Saved(t, self, key)

    def release(self, key: int) -> None:
        held = self._held[key]
        held[0] -= 1
        if held[0] == 0:
            del self._held[key]
            self.live -= held[1]

    def during(self, model: nn.Module, fn: Callable[[], R]) -> R:
        """``fn()`` with the saved tensors counted; ``model``'s parameters are not activations."""
        # why each call: an engine may re-place parameters (DeepSpeed flattens them into one buffer)
        self._params = {_local(p).untyped_storage().data_ptr() for p in model.parameters()}
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved.tensor):
            return fn()


def _local(p: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (``engine: fsdp``: a DTensor has no storage of its own), else ``p``."""
    return p.to_local() if isinstance(p, DTensor) else p


_METERS: weakref.WeakKeyDictionary[nn.Module, SavedTensorsPeak] = weakref.WeakKeyDictionary()


def count_saved(model: nn.Module, fn: Callable[[], R]) -> R:
    """``fn()`` (the trainer's step) with ``model``'s activation peak counted (``SavedTensorsPeak``);
    ``measured_memory`` reports it as ``activations_peak``."""
    meter = _METERS.get(model)
    if meter is None:
        meter = _METERS[model] = SavedTensorsPeak()
    return meter.during(model, fn)


def activations_peak(model: nn.Module, device: torch.device) -> dict[str, int]:
    """``activations_peak``: the largest ``SavedTensorsPeak.peak`` over ranks (a collective when
    distributed); nothing when no step ran under ``count_saved``."""
    meter = _METERS.get(model)
    value = torch.tensor([meter.peak if meter is not None else -1], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    peak = int(value.item())
    return {"activations_peak": peak} if peak >= 0 else {}
