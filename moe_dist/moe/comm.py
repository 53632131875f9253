"""Differentiable collectives and permutations used by the dispatcher and the balancing losses.

Shape legend: T tokens, D model dim, R ranks in a group, P (token, expert) pairs.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from moe_dist.errors import CollectiveError


@contextmanager
def named_collective(where: str) -> Iterator[None]:
    """Re-raise a failed or timed-out collective with the layer and stage that issued it.

    why: a peer that died or skipped a collective otherwise surfaces as an anonymous backend timeout.
    """
    try:
        yield
    except RuntimeError as e:  # gloo/NCCL timeouts and peer failures (DistBackendError is one)
        raise CollectiveError(f"{where} failed: {e}") from e


class GroupRef:
    """A process group held by weak reference (None stays None); ``get()`` returns it.

    why weak: ``dist.destroy_process_group()`` frees a gloo group, joining its worker threads, only when the
    group's last reference goes. A layer (or a layout, or an autograd node of a kept output) that held it
    strongly kept gloo's threads alive past an explicit destroy, into interpreter finalization, where a
    worker thread taking the GIL aborts the process (see ``moe_dist.runtime.teardown``). torch's own
    registry holds
    every live group, so a weak reference resolves for as long as the group exists.
    """

    __slots__ = ("_ref",)

    def __init__(self, group: Any) -> None:
        try:
            self._ref = weakref.ref(group) if group is not None else None
        except TypeError:  # an object that takes no weak reference (not a torch group): held as it is
            self._ref = lambda: group

    def get(self) -> Any:
        if self._ref is None:
            return None
        group = self._ref()
        if group is None:
            raise CollectiveError(
                "a process group this object was built over has been destroyed (by "
                "dist.destroy_process_group()); build it again over groups of the new process group"
            )
        return group


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; its backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x_PD: Tensor, out_splits: list[int], in_splits: list[int], group, where: str) -> Tensor:
        # why GroupRef: an output kept past a destroy keeps its graph, and this node, alive
        ctx.group, ctx.out_splits, ctx.in_splits, ctx.where = GroupRef(group), out_splits, in_splits, where
        # why contiguous: NCCL and gloo both need dense buffers for the uneven split layout
        x_PD = x_PD.contiguous()
        y_PD = x_PD.new_empty((sum(out_splits),) + tuple(x_PD.shape[1:]))
        with named_collective(where):
            dist.all_to_all_single(y_PD, x_PD, out_splits, in_splits, group=group)
        return y_PD

    @staticmethod
    def backward(ctx, grad_PD: Tensor):
        grad_PD = grad_PD.contiguous()
        g_PD = grad_PD.new_empty((sum(ctx.in_splits),) + tuple(grad_PD.shape[1:]))
        with named_collective(f"{ctx.where} (backward)"):
            dist.all_to_all_single(g_PD, grad_PD, ctx.in_splits, ctx.out_splits, group=ctx.group.get())
        return g_PD, None, None, None, None


def all_to_all(
    x_PD: Tensor, out_splits: list[int], in_splits: list[int], group, where: str = "all-to-all"
) -> Tensor:
    """Send ``in_splits[r]`` rows to rank r and receive ``out_splits[r]`` rows from rank r."""
    return _AllToAll.apply(x_PD, out_splits, in_splits, group, where)


class PendingAllToAll:
    """An all-to-all in flight, from ``all_to_all_start`` until ``all_to_all_wait``.

    In backward it carries the reverse all-to-all the other way: the wait's backward launches it and the
    start's backward waits for it. Autograd runs every node created between the two (e.g. the shared
    experts' backward) in that gap, so the backward wire is overlapped as the forward one is.
    """

    __slots__ = ("rows", "work", "send", "out_splits", "in_splits", "group", "where", "grad", "grad_work")

    def __init__(self, out_splits: list[int], in_splits: list[int], group, where: str) -> None:
        self.out_splits, self.in_splits, self.where = out_splits, in_splits, where
        self.group = GroupRef(group)  # why weak: see GroupRef (the graph may outlive a destroyed group)
        self.rows: Tensor | None = None
        """The receive buffer (the start's autograd output), valid after the wait."""
        self.work: Any = None
        self.send: Tensor | None = None
        """The buffer being sent (or, in backward, the gradient being sent): the backend reads it until
        the matching wait, so the handle keeps it alive until then."""
        self.grad: Tensor | None = None
        self.grad_work: Any = None


class _AllToAllStart(torch.autograd.Function):
    """Launch ``all_to_all_single`` with async_op=True; the output is the receive buffer, filled once
    ``_AllToAllWait`` has waited. Backward: wait for the reverse all-to-all the wait's backward began."""

    @staticmethod
    def forward(ctx, x_PD: Tensor, handle: PendingAllToAll) -> Tensor:
        ctx.handle = handle
        # why contiguous: NCCL and gloo both need dense buffers for the uneven split layout
        handle.send = x_PD.contiguous()
        y_PD = x_PD.new_empty((sum(handle.out_splits),) + tuple(x_PD.shape[1:]))
        with named_collective(handle.where):
            handle.work = dist.all_to_all_single(
                y_PD,
                handle.send,
                handle.out_splits,
                handle.in_splits,
                group=handle.group.get(),
                async_op=True,
            )
        return y_PD

    @staticmethod
    def backward(ctx, grad_PD: Tensor):
        handle: PendingAllToAll = ctx.handle
        with named_collective(f"{handle.where} (backward)"):
            handle.grad_work.wait()
        g_PD = handle.grad
        handle.grad = handle.grad_work = handle.send = None
        return g_PD, None


class _AllToAllWait(torch.autograd.Function):
    """Identity on the receive buffer once the all-to-all is done (forward: wait); backward: launch the
    reverse all-to-all of the gradient asynchronously and pass the gradient on to the start (unused there)."""

    @staticmethod
    def forward(ctx, y_PD: Tensor, handle: PendingAllToAll) -> Tensor:
        ctx.handle = handle
        with named_collective(handle.where):
            handle.work.wait()
        handle.work = handle.send = None
        return y_PD.view_as(y_PD)

    @staticmethod
    def backward(ctx, grad_PD: Tensor):
        handle: PendingAllToAll = ctx.handle
        handle.send = grad_PD.contiguous()
        handle.grad = grad_PD.new_empty((sum(handle.in_splits),) + tuple(grad_PD.shape[1:]))
        with named_collective(f"{handle.where} (backward)"):
            handle.grad_work = dist.all_to_all_single(
                handle.grad,
                handle.send,
                handle.in_splits,
                handle.out_splits,
                group=handle.group.get(),
                async_op=True,
            )
        return grad_PD, None


def all_to_all_start(
    x_PD: Tensor, out_splits: list[int], in_splits: list[int], group, where: str = "all-to-all"
) -> PendingAllToAll:
    """Begin sending ``in_splits[r]`` rows to rank r and receiving ``out_splits[r]`` from it; hand the result
    to ``all_to_all_wait`` (differentiable: together they are ``all_to_all``, computed the same way)."""
    handle = PendingAllToAll(out_splits, in_splits, group, where)
    handle.rows = _AllToAllStart.apply(x_PD, handle)
    return handle


def all_to_all_wait(handle: PendingAllToAll) -> Tensor:
    """The rows of ``all_to_all_start``'s all-to-all, once it has finished."""
    rows, handle.rows = handle.rows, None
    return _AllToAllWait.apply(rows, handle)


class _AllReduceSumScaledGrad(torch.autograd.Function):
    """Forward: sum over the group. Backward: the local gradient times the group size, no communication.

    why: every rank computes the *same* loss from the summed value, so d(loss)/d(sum) is identical on all
    ranks, and the true gradient of the group's summed objective w.r.t. this rank's input is R times it.
    After the usual mean over data-parallel ranks (divide by R), parameters see exactly the gradient of the
    single-process loss on the concatenated batch, whatever the per-rank token counts (Megatron-LM #3672).
    """

    @staticmethod
    def forward(ctx, x: Tensor, group, where: str) -> Tensor:
        ctx.scale = dist.get_world_size(group)
        y = x.clone()
        with named_collective(where):
            dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None, None


def all_reduce_sum_scaled_grad(x: Tensor, group, where: str = "all-reduce") -> Tensor:
    return _AllReduceSumScaledGrad.apply(x, group, where)


class _PermuteRows(torch.autograd.Function):
    """y = x[idx] for a permutation idx; backward gathers with the inverse permutation.

    why: the default backward of indexing is a scatter (index_put) that is slower than a gather.
    """

    @staticmethod
    def forward(ctx, x: Tensor, idx: Tensor, inv_idx: Tensor) -> Tensor:
        ctx.save_for_backward(inv_idx)
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inv_idx,) = ctx.saved_tensors
        return grad.index_select(0, inv_idx), None, None


def permute_rows(x: Tensor, idx: Tensor, inv_idx: Tensor) -> Tensor:
    return _PermuteRows.apply(x, idx, inv_idx)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    why: F.grouped_mm's CPU backward rejects stride-0 gradients such as the one ``.sum()`` produces.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.contiguous()


def contiguous_grad(x: Tensor) -> Tensor:
    return _ContiguousGrad.apply(x)
