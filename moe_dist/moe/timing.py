"""The layer's only knowledge of the profiler: named ranges and a small timing hook.

A hook receives ``record(layer, phase, event)`` calls at the stage boundaries of the expert-parallel path:

    forward  (phase="fwd"): dispatch_start, dispatch_end (the dispatch all-to-all, count exchange
                            included; under overlap_shared only its launch), dispatch_wait,
                            dispatch_ready (only under overlap_shared: the wait for it, after the shared
                            experts), experts_start, experts_end, combine_start, combine_end
    backward (phase="bwd"): experts_start (combine all-to-all backward done),
                            experts_end (dispatch all-to-all backward about to start)

``experts_start``/``experts_end`` bracket the expert compute E_r between the two all-to-alls in both
phases. ``tokens(layer, n)`` reports the number of (token, expert) rows this rank's experts received.
The profiler (``profiling/``) implements the hook; the layer never imports it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

import torch
from torch import Tensor


class TimingHook(Protocol):
    def record(self, layer: int, phase: str, event: str) -> None: ...

    def tokens(self, layer: int, n: int) -> None: ...

    def expert_delay(self, layer: int) -> None:
        """Called inside the forward expert stage; a test hook may sleep here to inject a known delay."""
        ...


class _BackwardMark(torch.autograd.Function):
    """Identity in forward; calls ``hook.record(layer, "bwd", event)`` when its gradient passes."""

    @staticmethod
    def forward(ctx, x: Tensor, hook: TimingHook, layer: int, event: str) -> Tensor:
        ctx.hook, ctx.layer, ctx.event = hook, layer, event
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.hook.record(ctx.layer, "bwd", ctx.event)
        return grad, None, None, None


def backward_mark(x: Tensor, hook: TimingHook | None, layer: int, event: str) -> Tensor:
    if hook is None or not x.requires_grad:
        return x
    return _BackwardMark.apply(x, hook, layer, event)


def stage_range(layer: int, stage: str) -> AbstractContextManager:
    """A torch.profiler range named ``moe/L{layer}/{stage}``; free when no profiler is running."""
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.profiler.record_function(f"moe/L{layer}/{stage}")
    return nullcontext()
