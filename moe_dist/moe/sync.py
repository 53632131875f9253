"""Keeping ranks consistent when the layer is used as a library: the trainer's gradient rule
(``sync_gradients``) and a start-up broadcast (``broadcast_parameters``).

Two kinds of parameters, told apart by module type, never by name:
- **expert** parameters are those of ``MoELayer.experts`` for every ``MoELayer`` inside the module: each
  rank holds its own slots of the N experts (by the layer's placement; N/R contiguous experts by default),
  replicated over the expert-data-parallel group (the ranks at the same EP position, one per EP group);
  under a replicated placement an expert also sits in several slots of the EP group;
- **dense** parameters are all the others (router, attention, embeddings, ...): replicated on every rank
  of the dense group.

The objective is the mean over the dense group of each rank's loss. A dense parameter's gradient is the
mean over the dense group. An expert's local gradient already sums the tokens of its whole EP group
(through the all-to-all backward), so it is summed over the expert-data-parallel group and divided by the
dense group's size. DeepSpeed does the same (``_reduce_expert_gradients``). An expert held by several
slots (replicas) gets in every replica the sum of all its replicas' gradients over the EP group, so the
replicas, equal at start, take the same optimizer step and stay equal.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moe_dist.errors import ConfigError
from moe_dist.moe.layer import moe_layers
from moe_dist.runtime.teardown import destroy_process_groups_at_exit


def expert_params(module: nn.Module) -> list[nn.Parameter]:
    """Parameters of every ``MoELayer.experts`` in ``module``: each lives on one EP rank per replica."""
    return [p for m in moe_layers(module) for p in m.experts.parameters()]


def dense_params(module: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``module`` that is not an expert parameter: replicated on all ranks."""
    ids = {id(p) for p in expert_params(module)}
    return [p for p in module.parameters() if id(p) not in ids]


def group_size(group) -> int:
    """Ranks in ``group`` (None = the default group); 1 when no process group exists."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def sync_gradients(module: nn.Module, dense_group=None, expert_dp_group=None) -> float:
    """Apply the trainer's gradient rule to ``module`` after ``backward()``, before ``optimizer.step()``.

    Args:
        module: a bare ``MoELayer`` or any module containing them.
        dense_group: ranks that hold identical dense parameters (None = the default group, as in
            ``torch.distributed``). Dense grads become their mean over it.
        expert_dp_group: ranks holding the *same* experts (one per EP group). None = no such replicas:
            every expert lives on exactly one rank (EP spans the whole dense group). Expert grads become
            their sum over it divided by the dense group's size.

    Replicated placements (an expert in several slots of a layer's EP group): each replica's grad becomes
    the sum over all the expert's replicas, one all-reduce over the EP group (the layer's own
    ``ep_group``) for all replicated layers sharing it; layers without replicas pay nothing.

    A parameter that requires grad but has none (an expert that got no tokens, a branch this rank did not
    take) gets a zero grad first: every rank must bring the same buffers to the all-reduce.
    Raises ``ConfigError`` if a layer's EP size times the replica count is not the dense group's size.

    Returns the seconds spent on the replica sum (0.0 when no layer is replicated): host time, so under
    an asynchronous backend (NCCL) it is the time to issue the work unless the caller synchronizes.
    """
    experts = [p for p in expert_params(module) if p.requires_grad]
    dense = [p for p in dense_params(module) if p.requires_grad]
    for p in dense + experts:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    world = group_size(dense_group)
    replicas = group_size(expert_dp_group) if expert_dp_group is not None else 1
    _check_layout(module, world, replicas)
    if world == 1:
        return 0.0
    destroy_process_groups_at_exit()
    _all_reduce_scaled([p.grad for p in dense], dense_group, 1.0 / world)
    if expert_dp_group is not None and replicas > 1:
        _all_reduce_scaled([p.grad for p in experts], expert_dp_group, 1.0 / world)
    else:
        for p in experts:
            p.grad.mul_(1.0 / world)
    # why after the expert-data-parallel sum: every EP group then sums the same per-slot values in the same
    # rank order, so all copies of an expert (replicas and their DP copies) get the same bits
    return _sum_over_replicas(module, lambda p: p.grad, keep_owner_only=False)


@torch.no_grad()
def broadcast_parameters(module: nn.Module, dense_group=None, expert_dp_group=None) -> None:
    """Make every replica equal to the first rank of its group, as DDP does at construction.

    Dense parameters and the buffers outside the experts (the router's selection bias, alpha; not the
    layers' per-rank route tables) come from rank 0 of ``dense_group``; expert parameters from rank 0 of
    ``expert_dp_group`` (None: no replicas, nothing to send), and each replica slot of an expert from the
    expert's first replica in its EP group. Call it once after building, before training; the groups mean
    what they mean in ``sync_gradients``.
    """
    experts = expert_params(module)
    world = group_size(dense_group)
    replicas = group_size(expert_dp_group) if expert_dp_group is not None else 1
    _check_layout(module, world, replicas)
    if world == 1:
        return
    destroy_process_groups_at_exit()
    # why not the route tables and dispatch counts: each rank's own (route tables differ by rank under a
    # replicated placement; the counts are of this rank's tokens)
    local = {
        id(b) for m in moe_layers(module) for b in [*m.experts.buffers(), m.route_slot_N, m.sent_counts_N]
    }
    dense = dense_params(module) + [b for b in module.buffers() if id(b) not in local]
    _broadcast_from_first(dense, dense_group)
    if expert_dp_group is not None and replicas > 1:
        _broadcast_from_first(experts, expert_dp_group)
    # replicas within an EP group: every slot of an expert takes its first replica's weights
    _sum_over_replicas(module, lambda p: p.data, keep_owner_only=True)


def owned_expert_grads(module: nn.Module) -> list[Tensor]:
    """The grads of this rank's expert slots that hold the first replica of their expert (all slots when a
    layer has no replicas): summed over the EP group, each logical expert counts once (the grad norm)."""
    out = []
    for layer in moe_layers(module):
        for p in layer.experts.parameters():
            if p.grad is None:
                continue
            if not layer.placement.is_replicated():
                out.append(p.grad)
            else:
                # a rank may own no expert (all its slots replicas): the index is then empty, still int64
                owned = torch.tensor(layer.owned_slots, dtype=torch.long, device=p.grad.device)
                out.append(p.grad.index_select(0, owned))
    return out


@torch.no_grad()
def _sum_over_replicas(
    module: nn.Module, get: Callable[[nn.Parameter], Tensor | None], keep_owner_only: bool
) -> float:
    """For every layer with a replicated placement, make each replica slot's tensor (``get(param)``) the
    sum over the expert's replicas in the EP group (``keep_owner_only``: the first replica's value alone).
    One all-reduce per (EP group, dtype, device) for all such layers: per layer and leaf a block [n, X]
    (n replicated experts, X numel of one expert's leaf) filled from this rank's slots, zeros for the
    experts it does not hold (x + 0 is exact, so the sum is that of the replicas alone). Returns seconds.
    """
    layers = [m for m in moe_layers(module) if m.placement.is_replicated()]
    if not layers:
        return 0.0
    t0 = time.perf_counter()
    buckets: dict[tuple, tuple[object, list]] = {}  # (id(group), dtype, device) -> (group, items)
    for m in layers:
        p = m.placement
        replicated = p.replicated_experts()
        # (block row, local slot) of every local replica, and of those this rank contributes
        back = [(i, s) for i, e in enumerate(replicated) for r, s in p.replicas(e) if r == m.ep_rank]
        fill = [(i, s) for i, s in back if not keep_owner_only or p.owner(replicated[i]) == (m.ep_rank, s)]
        for param in m.experts.parameters():
            t = get(param)
            if t is not None:
                key = (id(m.ep_group), t.dtype, t.device)
                buckets.setdefault(key, (m.ep_group, []))[1].append((t, len(replicated), fill, back))
    for group, items in buckets.values():
        sizes = [n * t[0].numel() for t, n, _, _ in items]
        flat = items[0][0].new_zeros(sum(sizes))
        blocks = [chunk.view(n, -1) for (_, n, _, _), chunk in zip(items, flat.split(sizes), strict=True)]
        for (t, _, fill, _), block_nX in zip(items, blocks, strict=True):
            if fill:
                rows, slots = _index(fill, t.device)
                block_nX.index_copy_(0, rows, t.index_select(0, slots).reshape(len(fill), -1))
        dist.all_reduce(flat, group=group)
        for (t, _, _, back), block_nX in zip(items, blocks, strict=True):
            if back:
                rows, slots = _index(back, t.device)
                t.index_copy_(0, slots, block_nX.index_select(0, rows).view(len(back), *t.shape[1:]))
    return time.perf_counter() - t0


def _index(pairs: list[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor]:
    rows_slots = torch.tensor(pairs, dtype=torch.int64).t()
    return rows_slots[0].to(device), rows_slots[1].to(device)


def _check_layout(module: nn.Module, world: int, replicas: int) -> None:
    """EP ranks x expert replicas must be exactly the dense group, or the 1/world scale is wrong."""
    for layer in moe_layers(module):
        if layer.ep_size * replicas != world:
            raise ConfigError(
                f"MoE layer {layer.layer_idx} splits its experts over {layer.ep_size} EP rank(s) and "
                f"expert_dp_group has {replicas} rank(s), but the dense group has {world}: the expert "
                "replicas must be the dense group's ranks at the same EP position (pass expert_dp_group "
                "when each expert lives on more than one rank)"
            )


def _by_dtype(tensors: list[Tensor]) -> list[list[Tensor]]:
    """Buckets of one (device, dtype) each: a flat buffer cannot mix them."""
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    return list(buckets.values())


def _flat_collective(tensors: list[Tensor], collective: Callable[[Tensor], None]) -> None:
    """Run ``collective`` in place on one flat buffer per (device, dtype) bucket instead of once per tensor,
    and copy the result back into ``tensors``."""
    for bucket in _by_dtype(tensors):
        flat = _flatten_dense_tensors(bucket)
        collective(flat)
        for t, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
            t.copy_(synced)


def _all_reduce_scaled(grads: list[Tensor], group, scale: float) -> None:
    """Sum over ``group``, times ``scale``."""

    def reduce(flat: Tensor) -> None:
        dist.all_reduce(flat, group=group)
        flat.mul_(scale)

    _flat_collective(grads, reduce)


def _broadcast_from_first(tensors: list[Tensor], group) -> None:
    _flat_collective(tensors, lambda flat: dist.broadcast(flat, group=group, group_src=0))
