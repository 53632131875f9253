"""Exact migration of stacked expert slots (weights, optimizer state) from one placement to another.

Shape legend: L slots per rank, R EP ranks, Q = R * L global slots, Y bytes of one slot's row (every tensor of
that slot, flattened and viewed as bytes, back to back).

Every tensor handed in is stacked over this rank's slots on dim 0 ([L, ...]): the expert weights, and
AdamW's exp_avg / exp_avg_sq of the same shape; every rank hands in the same names and shapes. New slot
(r, s) holding logical expert e is copied from one replica of e under the old placement: the replica on rank
r itself if there is one (first in slot order; no bytes move), else the first replica in rank order.
Every rank derives the same plan from (old, new), so the transfer is ONE ``all_to_all_single`` of bytes
with uneven splits and no collective before it; a migration in which no slot changes rank runs none.

why bytes: viewing every tensor as uint8 lets weights and optimizer state of every dtype (and every MoE
layer) travel in one call, since gloo wants one dtype per call, and a byte copy is bitwise exact.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_dist.errors import ConfigError
from moe_dist.moe.placement import Placement
from moe_dist.placement.rebalance import moved_slots

log = logging.getLogger("moe_dist.placement.migrate")


@dataclass(frozen=True)
class MigrationStats:
    seconds: float
    """Wall time of the migration on this rank (plan, copies, the all-to-all, write-back)."""
    bytes_sent: int
    """Bytes this rank sent to other ranks."""
    bytes_received: int
    bytes_total: int
    """Bytes sent over the whole EP group (the same number on every rank)."""
    slots_changed: int
    """Slots whose logical expert changed, over the EP group and every layer."""


def sources(old: Placement, new: Placement) -> list[tuple[int, int]]:
    """(rank, slot) under ``old`` that new global slot q = r * L + s copies from (module doc)."""
    if old.shape != new.shape:
        raise ConfigError(
            f"migration needs placements of one shape: {old.ep}x{old.slots_per_rank} of {old.num_experts} "
            f"experts vs {new.ep}x{new.slots_per_rank} of {new.num_experts} (L is fixed for a run)"
        )
    out = []
    for r, row in enumerate(new.slot_expert_RL):
        for e in row:
            reps = old.replicas(e)
            out.append(next((rs for rs in reps if rs[0] == r), reps[0]))
    return out


def transfer_bytes(old: Placement, new: Placement, row_bytes: int) -> list[list[int]]:
    """[R][R] bytes that rank q sends to rank d (q != d) when every slot row is ``row_bytes`` long."""
    L, R = new.slots_per_rank, new.ep
    out = [[0] * R for _ in range(R)]
    for q, (src, _) in enumerate(sources(old, new)):
        if src != q // L:
            out[src][q // L] += row_bytes
    return out


def _recv_slots(src: list[tuple[int, int]], L: int, me: int, q: int) -> list[tuple[int, int]]:
    """(new slot on ``me``, its source slot on ``q``) for the slots rank ``me`` receives from ``q``."""
    return [(s, src[me * L + s][1]) for s in range(L) if src[me * L + s][0] == q]


def _row_bytes(tensors: dict[str, Tensor]) -> int:
    return sum(t[0].numel() * t.element_size() for t in tensors.values())


def _pack(tensors: dict[str, Tensor], slots: list[int]) -> Tensor:
    """uint8 [len(slots), Y]: the rows of ``slots``, every tensor's bytes back to back."""
    idx = torch.tensor(slots, dtype=torch.long, device=next(iter(tensors.values())).device)
    # index_select returns a fresh contiguous tensor: its byte view is legal for any stride of t
    parts = [t.index_select(0, idx).reshape(len(slots), -1).view(torch.uint8) for t in tensors.values()]
    return torch.cat(parts, dim=1)


def _unpack(rows_XY: Tensor, tensors: dict[str, Tensor], out: dict[str, Tensor], slots: list[int]) -> None:
    """Write the byte rows back into ``out``'s ``slots``, tensor by tensor (the layout of ``_pack``)."""
    idx = torch.tensor(slots, dtype=torch.long, device=rows_XY.device)
    off = 0
    for name, t in tensors.items():
        width = t[0].numel() * t.element_size()
        # why a fresh buffer (not .contiguous()): a dtype view needs storage offset 0 and a byte count per
        # row that the element size divides, which a column slice of the rows has not
        chunk = rows_XY.new_empty(len(slots), width)
        chunk.copy_(rows_XY[:, off : off + width])
        out[name].index_copy_(0, idx, chunk.view(t.dtype).reshape(len(slots), *t.shape[1:]))
        off += width


def _sync(jobs: Sequence[Job]) -> None:
    if jobs and next(iter(jobs[0].tensors.values())).is_cuda:
        torch.cuda.synchronize()  # why: the clock must include the copies still queued on the device


@dataclass(frozen=True)
class Job:
    """One set of stacked tensors (e.g. one MoE layer's) and its placement change."""

    tensors: dict[str, Tensor]
    old: Placement
    new: Placement


def migrate_many(
    jobs: Sequence[Job], ep_group: dist.ProcessGroup | None
) -> tuple[list[dict], MigrationStats]:
    """New stacked tensors for every job, moved in ONE all-to-all over ``ep_group`` (None: EP = 1)."""
    t0 = time.perf_counter()
    R = dist.get_world_size(ep_group) if ep_group is not None else 1
    me = dist.get_rank(ep_group) if ep_group is not None else 0
    plans = []
    for j in jobs:
        L = j.new.slots_per_rank
        if j.new.ep != R:
            raise ConfigError(f"migration: the placement has {j.new.ep} EP ranks, the EP group {R}")
        for name, t in j.tensors.items():
            if t.dim() == 0 or t.shape[0] != L:
                raise ConfigError(f"migration: {name} has shape {tuple(t.shape)}, not [L={L}, ...]")
        plans.append(sources(j.old, j.new))
    # the byte count of every (source, destination) pair, known to every rank without a collective
    pair_bytes = [[0] * R for _ in range(R)]
    changed = 0
    for j in jobs:
        changed += len(moved_slots(j.old, j.new))
        for q, row in enumerate(transfer_bytes(j.old, j.new, _row_bytes(j.tensors))):
            for d, b in enumerate(row):
                pair_bytes[q][d] += b
    outs: list[dict] = []
    for j, src in zip(jobs, plans, strict=True):
        L = j.new.slots_per_rank
        out = {k: torch.empty_like(t) for k, t in j.tensors.items()}
        local = _recv_slots(src, L, me, me)
        if local:  # sources on this rank: a plain copy between slots
            device = next(iter(j.tensors.values())).device
            dst = torch.tensor([a for a, _ in local], dtype=torch.long, device=device)
            src_idx = torch.tensor([b for _, b in local], dtype=torch.long, device=device)
            for k, t in j.tensors.items():
                out[k].index_copy_(0, dst, t.index_select(0, src_idx))
        outs.append(out)
    total = sum(map(sum, pair_bytes))
    if total:
        device = next(iter(jobs[0].tensors.values())).device
        send = []
        for d in range(R):
            for j, src in zip(jobs, plans, strict=True):
                slots = [b for _, b in _recv_slots(src, j.new.slots_per_rank, d, me)] if d != me else []
                if slots:
                    send.append(_pack(j.tensors, slots).reshape(-1))
        send_buf = torch.cat(send) if send else torch.empty(0, dtype=torch.uint8, device=device)
        recv_buf = torch.empty(sum(pair_bytes[q][me] for q in range(R)), dtype=torch.uint8, device=device)
        dist.all_to_all_single(
            recv_buf,
            send_buf,
            output_split_sizes=[pair_bytes[q][me] for q in range(R)],
            input_split_sizes=[pair_bytes[me][d] for d in range(R)],
            group=ep_group,
        )
        off = 0
        for q in range(R):
            if q == me:
                continue
            for j, src, out in zip(jobs, plans, outs, strict=True):
                pairs = _recv_slots(src, j.new.slots_per_rank, me, q)
                if pairs:
                    n = len(pairs) * _row_bytes(j.tensors)
                    rows = recv_buf[off : off + n].reshape(len(pairs), -1)
                    _unpack(rows, j.tensors, out, [a for a, _ in pairs])
                    off += n
    _sync(jobs)
    stats = MigrationStats(
        seconds=time.perf_counter() - t0,
        bytes_sent=sum(pair_bytes[me]),
        bytes_received=sum(pair_bytes[q][me] for q in range(R)),
        bytes_total=total,
        slots_changed=changed,
    )
    return outs, stats


def migrate(
    tensors_by_param: dict[str, Tensor], old: Placement, new: Placement, ep_group: dist.ProcessGroup | None
) -> tuple[dict[str, Tensor], MigrationStats]:
    """This EP rank's stacked tensors ([L, ...] each) under ``new``: every slot holds the rows of its
    logical expert, copied bit for bit from one replica of it under ``old``."""
    outs, stats = migrate_many([Job(tensors_by_param, old, new)], ep_group)
    return outs[0], stats


class PlacedLayer(Protocol):
    """What ``migrate_layers`` assumes of an MoE layer (the layer's own placement API may differ)."""

    experts: nn.Module
    """Every parameter stacked on dim 0 over this rank's L slots."""
    placement: Placement

    def set_placement(self, placement: Placement) -> None: ...


def layer_tensors(layer: PlacedLayer, optimizer: torch.optim.Optimizer | None) -> dict[str, Tensor]:
    """The layer's expert parameters and every optimizer state tensor of their shape (AdamW: exp_avg,
    exp_avg_sq, max_exp_avg_sq). The scalar ``step`` is one per stacked parameter, hence the same for every
    slot, and stays as it is.

    why no gradients: every rank must pack the same tensors (the byte layout is not exchanged), and a
    gradient may exist on one rank and not on another; a migration belongs between optimizer steps.
    """
    out: dict[str, Tensor] = {}
    for i, p in enumerate(layer.experts.parameters()):
        if p.grad is not None:
            raise ConfigError(
                "migration: an expert parameter still has a gradient; migrate after the optimizer step and "
                "zero_grad(set_to_none=True)"
            )
        out[f"{i}"] = p.detach()
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        for k, v in state.items():
            if not torch.is_tensor(v) or v.dim() == 0:
                continue
            if v.shape != p.shape:
                raise ConfigError(
                    f"migration: optimizer state {k!r} has shape {tuple(v.shape)}, the parameter "
                    f"{tuple(p.shape)}: only per-slot state of the parameter's shape can be migrated"
                )
            out[f"{i}.{k}"] = v
    return out


def migrate_layers(
    layers: Sequence[PlacedLayer],
    new: Sequence[Placement],
    optimizer: torch.optim.Optimizer | None,
    ep_group: dist.ProcessGroup | None,
) -> MigrationStats:
    """Move every layer to its new placement in place: one all-to-all for all layers, then each parameter,
    gradient and optimizer state tensor is overwritten with ``copy_`` (the Parameter objects stay, so the
    optimizer's param_groups still point at them), and ``layer.set_placement(new)`` is called.

    Call it between optimizer steps on every rank of the EP group, with the same ``new`` everywhere. A layer
    whose table does not change is left alone (``set_placement`` is still called when the version differs).
    """
    t0 = time.perf_counter()
    jobs, moving = [], []
    for layer, p_new in zip(layers, new, strict=True):
        if layer.placement.slot_expert_RL != p_new.slot_expert_RL:
            jobs.append(Job(layer_tensors(layer, optimizer), layer.placement, p_new))
            moving.append((layer, p_new))
        elif layer.placement.version != p_new.version:
            layer.set_placement(p_new)
    outs, stats = migrate_many(jobs, ep_group) if jobs else ([], MigrationStats(0.0, 0, 0, 0, 0))
    with torch.no_grad():
        for job, out, (layer, p_new) in zip(jobs, outs, moving, strict=True):
            for k, t in job.tensors.items():
                t.copy_(out[k])  # why copy_: same shape (L is fixed), and the optimizer keeps its references
            layer.set_placement(p_new)
    _sync(jobs)
    seconds = time.perf_counter() - t0
    log.info(
        "migrated %d layers: %d slots changed, %d bytes sent by this rank, %d over the EP group, %.3f s",
        len(jobs),
        stats.slots_changed,
        stats.bytes_sent,
        stats.bytes_total,
        seconds,
    )
    return MigrationStats(
        seconds, stats.bytes_sent, stats.bytes_received, stats.bytes_total, stats.slots_changed
    )
