"""The communication floor: our layer with its expert-parallel all-to-alls replaced by local copies.

Shape legend: P dispatched rows, D model dim.

Each all-to-all of the token dispatch and combine (forward and backward) becomes a copy of the same number
of rows into a new buffer: a rank computes on exactly the rows it would have received (the splits still
come from the balancing all-reduce, so routing, permutes, grouped GEMMs and the imbalance between ranks are
unchanged), but nothing crosses the wire and no rank waits inside an all-to-all. The rows' values are
wrong (this rank's own rows, zero-padded), which does not matter for timing. The balancing statistics
all-reduce stays: it is one small collective per layer and keeps the ranks in step as before.

Timing only: never use this layer for training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from moe_dist import MoEConfig, MoELayer
from moe_dist.moe.comm import all_to_all
from moe_dist.moe.dispatcher import AllToAllDispatcher, register_dispatcher


def _same_size_copy(x_PD: Tensor, rows: int) -> Tensor:
    """A new [rows, D] buffer: the first min(rows, P) rows of x, then zeros.

    why zeros and not torch.empty: uninitialised memory can hold denormals, which slow the GEMMs down.
    """
    y_PD = x_PD.new_empty((rows, *x_PD.shape[1:]))
    n = min(rows, x_PD.shape[0])
    y_PD[:n].copy_(x_PD[:n])
    y_PD[n:].zero_()
    return y_PD


class _LocalCopy(torch.autograd.Function):
    """In place of ``moe_dist.moe.comm._AllToAll``: same output sizes, no communication."""

    @staticmethod
    def forward(ctx, x_PD: Tensor, out_splits: list[int]) -> Tensor:
        ctx.rows_in = x_PD.shape[0]
        # why contiguous: the real all-to-all makes its input contiguous too
        return _same_size_copy(x_PD.contiguous(), sum(out_splits))

    @staticmethod
    def backward(ctx, grad_PD: Tensor):
        return _same_size_copy(grad_PD.contiguous(), ctx.rows_in), None


class LocalCopyDispatcher(AllToAllDispatcher):
    """``AllToAllDispatcher`` whose token exchange is a same-size local copy (see the module doc).

    why a subclass that replaces only ``exchange``: the splits, permutes, profiler ranges and timing records
    stay the real dispatcher's, so the floor cannot drift from the layer it measures.
    """

    def exchange(self, x_PD: Tensor, out_splits: list[int], in_splits: list[int], where: str) -> Tensor:
        return _LocalCopy.apply(x_PD, out_splits)


NOCOMM = "nocomm"
register_dispatcher(NOCOMM, LocalCopyDispatcher)


def nocomm_layer(cfg: MoEConfig, group) -> MoELayer:
    """Our layer on ``group`` (its EP and balance group), with local copies for its all-to-alls."""
    if group is None or dist.get_world_size(group) < 2:
        raise ValueError("the no-communication layer needs an EP group of 2 or more ranks")
    return MoELayer(cfg, ep_group=group, balance_group=group, dispatcher=NOCOMM)


def wire_only(top_k: int, group) -> Callable[[Tensor], Tensor]:
    """The wire alone: the four token all-to-alls of a dropless layer (dispatch and combine, forward and
    backward) on T·K rows of the input, split evenly over the ranks, with no routing and no compute.

    Its time plus ``ours_nocomm``'s is the measured floor of our layer with communication on this machine;
    even splits leave out the wait for a rank that drew more rows, which ``ours_nocomm`` keeps.
    """
    world = dist.get_world_size(group)

    def forward(x_TD: Tensor) -> Tensor:
        rows_PD = x_TD.repeat(top_k, 1)  # why: one row per (token, choice), as the dispatcher sends
        if torch.is_autocast_enabled(x_TD.device.type):  # our layer sends autocast-dtype rows
            rows_PD = rows_PD.to(torch.get_autocast_dtype(x_TD.device.type))
        n = rows_PD.shape[0]
        splits = [n // world + (r < n % world) for r in range(world)]
        y_PD = all_to_all(rows_PD, splits, splits, group, "dispatch all-to-all")
        z_PD = all_to_all(y_PD, splits, splits, group, "combine all-to-all")
        return z_PD.view(top_k, *x_TD.shape).sum(0)

    return forward
