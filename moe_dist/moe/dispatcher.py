"""Token dispatch: permute (local) and all-to-all (communication) as separate steps, one interface.

Shape legend: T tokens, D model dim, K top-k, N logical experts, R ranks in the EP group, L local slots per
rank, Q = R * L global slots, P (token, expert) pairs kept after capacity (P <= T*K).

Routes are planned by global slot (``moe_dist.moe.placement``): the layer maps each pair's logical expert to
the slot this rank sends it to, so pairs sorted by slot id are grouped by destination rank, then slot.
``dispatch()`` returns the rows grouped by local slot, their per-slot counts, and a ``DispatchMeta`` that
``combine()`` takes back. ``LocalDispatcher`` runs everything on this rank; ``AllToAllDispatcher`` sends
rows to the slot's rank with ``all_to_all_single`` and uneven splits.

Every dispatcher keeps to the ``Dispatcher`` protocol and is built by name through ``make_dispatcher``
from one ``DispatcherSpec``; ``register_dispatcher`` adds a name (a benchmark or a later config option
can register its own class without touching the layer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor

from moe_dist.errors import ConfigError
from moe_dist.moe.comm import (
    GroupRef,
    PendingAllToAll,
    all_to_all,
    all_to_all_start,
    all_to_all_wait,
    named_collective,
    permute_rows,
)
from moe_dist.moe.placement import Placement
from moe_dist.moe.timing import TimingHook, backward_mark, stage_range


@dataclass
class RoutePlan:
    """Local permutation of (token, expert) pairs into slot-sorted order, with capacity applied."""

    order_P: Tensor
    """Pair index (t*K + k) of each kept pair, sorted by slot (stable; by score within a slot)."""
    pair_slot_TK: Tensor
    """Row of each pair in the sorted buffer, or P (a zero row) when the pair was dropped."""
    counts_Q: Tensor
    """int64 [Q]: kept pairs per global slot on this rank."""
    dropped: Tensor
    """int64 scalar: pairs dropped by capacity on this rank."""
    any_dropped: bool
    gates_TK: Tensor | None = None
    """The routing gates, for a dispatcher that weights on the receiving side ("dedup"); None elsewhere."""
    prepared: object = None
    """What the dispatcher's ``prepare`` computed from this plan (dedup: its token rows); None elsewhere."""


@dataclass
class DispatchMeta:
    plan: RoutePlan
    num_tokens: int
    send_splits: list[int] | None = None
    recv_splits: list[int] | None = None
    regroup_idx: Tensor | None = None
    regroup_inv: Tensor | None = None
    wire_rows: int = 0
    """D-wide rows this rank sent to other ranks in the dispatch all-to-all (rows to itself stay local)."""
    wire_bytes: int = 0
    """Bytes of those rows and of any per-pair lists sent with them (the count exchange aside)."""


@dataclass
class PendingDispatch:
    """What ``dispatch_start`` hands ``dispatch_finish``: the dispatch up to its all-to-all(s) of rows, which
    may still be in flight (``overlap``)."""

    meta: DispatchMeta | None = None
    sent: list[Tensor | PendingAllToAll] | None = None
    """What each all-to-all of the dispatch returned: its rows, or its handle while in flight."""
    recv_RL: list[list[int]] | None = None
    done: tuple[Tensor, Tensor, DispatchMeta] | None = None
    """A dispatcher without communication (``LocalDispatcher``) finishes in ``dispatch_start``."""


def plan_routes(
    slot_TK: Tensor,
    topk_scores_TK: Tensor,
    num_slots: int,
    capacity_factor: float | None,
    num_experts: int | None = None,
    gates_TK: Tensor | None = None,
) -> RoutePlan:
    """Sort pairs by global slot; with a capacity, keep each slot's top-C pairs by score on this rank.

    C = ceil(cf * K * T / N) with N = ``num_experts`` logical experts (default ``num_slots``): a sender
    sends all its pairs of an expert to one slot, so each slot's cap is its expert's, and the drops are
    those of the same routing without replicas.
    """
    T, K = slot_TK.shape
    slot_P = slot_TK.reshape(-1)
    counts_Q = torch.zeros(num_slots, dtype=torch.int64, device=slot_P.device).scatter_add_(
        0, slot_P, torch.ones_like(slot_P)
    )  # not bincount: it syncs with the host on CUDA
    if capacity_factor is None:
        order = torch.argsort(slot_P, stable=True)
        row = torch.empty_like(order)
        row[order] = torch.arange(order.numel(), device=order.device)
        return RoutePlan(order, row.view(T, K), counts_Q, counts_Q.new_zeros(()), False, gates_TK)
    capacity = math.ceil(capacity_factor * K * T / (num_experts or num_slots))
    # why two stable sorts: by score (descending), then by slot, so each slot's pairs are best-first
    by_score = torch.argsort(topk_scores_TK.reshape(-1).detach(), descending=True, stable=True)
    order = by_score[torch.argsort(slot_P[by_score], stable=True)]
    starts_Q = torch.cumsum(counts_Q, 0) - counts_Q
    rank_in_slot = torch.arange(order.numel(), device=order.device) - starts_Q[slot_P[order]]
    keep = rank_in_slot < capacity
    kept = order[keep]
    kept_counts_Q = counts_Q.clamp(max=capacity)
    row = torch.full((T * K,), kept.numel(), dtype=torch.int64, device=order.device)
    row[kept] = torch.arange(kept.numel(), device=order.device)
    dropped = counts_Q.sum() - kept_counts_Q.sum()
    return RoutePlan(kept, row.view(T, K), kept_counts_Q, dropped, True, gates_TK)


class _GatherPairs(torch.autograd.Function):
    """x_TD -> sorted pair rows x[order // K]; backward gathers each pair's grad and sums over K.

    why: avoids index_add/scatter in backward; dropped pairs read a zero row.
    """

    @staticmethod
    def forward(ctx, x_TD: Tensor, plan: RoutePlan, K: int) -> Tensor:
        ctx.plan, ctx.K = plan, K
        return x_TD.index_select(0, plan.order_P // K)

    @staticmethod
    def backward(ctx, grad_PD: Tensor):
        plan = ctx.plan
        if plan.any_dropped:
            grad_PD = torch.cat([grad_PD, grad_PD.new_zeros(1, grad_PD.shape[1])])
        T, K = plan.pair_slot_TK.shape
        # why an explicit D (not -1): a rank with zero tokens has T = 0, where -1 is ambiguous
        g = grad_PD.index_select(0, plan.pair_slot_TK.reshape(-1)).view(T, K, grad_PD.shape[1]).sum(1)
        return g, None, None


class _ScatterPairs(torch.autograd.Function):
    """Sorted rows y_PD -> per-pair rows [T, K, D] (zeros for dropped pairs); backward is a gather."""

    @staticmethod
    def forward(ctx, y_PD: Tensor, plan: RoutePlan) -> Tensor:
        ctx.plan = plan
        if plan.any_dropped:
            y_PD = torch.cat([y_PD, y_PD.new_zeros(1, y_PD.shape[1])])
        T, K = plan.pair_slot_TK.shape
        return y_PD.index_select(0, plan.pair_slot_TK.reshape(-1)).view(T, K, y_PD.shape[1])

    @staticmethod
    def backward(ctx, grad_TKD: Tensor):
        plan = ctx.plan
        g = grad_TKD.reshape(-1, grad_TKD.shape[-1]).index_select(0, plan.order_P)
        return g, None


@dataclass
class DispatcherSpec:
    """What the layer hands a dispatcher class: the same arguments for every kind."""

    num_experts: int
    placement: Placement
    """Which logical expert each slot of the EP group holds (every rank: the same)."""
    group: object = None
    """The EP group (None: one rank)."""
    layer: int = 0
    """Names the layer in profiler ranges, timing records and errors."""
    hook: TimingHook | None = None
    count_rows: list[int] | None = None
    """Row of each EP-group member in the balancing all-reduce's count block (see AllToAllDispatcher)."""


@runtime_checkable
class Dispatcher(Protocol):
    """Moves (token, expert) rows to the rank of their slot and back.

    ``dispatch`` returns the rows grouped by local slot, the int64 [L] rows per local slot and the metadata
    that ``combine`` takes back; local permutes and communication are separate steps inside, each in its
    own profiler range. ``dispatch_finish(dispatch_start(...))`` is ``dispatch``, split where the rows'
    all-to-all is in flight: with ``overlap`` the layer computes what does not need the received rows (the
    shared experts) between the two. ``LocalDispatcher`` gives every subclass both, running ``dispatch``
    in the start (so a subclass that overrides only ``dispatch`` keeps working, without overlap).
    """

    layer: int
    num_slots: int

    def prepare(self, plan: RoutePlan) -> Tensor | None: ...

    def dispatch(
        self, x_TD: Tensor, plan: RoutePlan, counts_RN: list[list[int]] | None = None
    ) -> tuple[Tensor, Tensor, DispatchMeta]: ...

    def dispatch_start(
        self, x_TD: Tensor, plan: RoutePlan, counts_RN: list[list[int]] | None = None, overlap: bool = False
    ) -> PendingDispatch: ...

    def dispatch_finish(self, pending: PendingDispatch) -> tuple[Tensor, Tensor, DispatchMeta]: ...

    def combine(self, y_PD: Tensor, gates_TK: Tensor, meta: DispatchMeta) -> Tensor: ...

    def set_placement(self, placement: Placement) -> None: ...


DispatcherClass = Callable[[DispatcherSpec], Dispatcher]
_DISPATCHERS: dict[str, DispatcherClass] = {}


def register_dispatcher(name: str, cls: DispatcherClass) -> None:
    """Make ``name`` buildable by ``make_dispatcher``; ``cls(spec)`` builds one."""
    _DISPATCHERS[name] = cls


def dispatcher_names() -> list[str]:
    return sorted(_DISPATCHERS)


DISPATCH_MODES = {"pairs": "all_to_all", "dedup": "dedup"}
"""``MoEConfig.dispatch`` -> the registered dispatcher that implements it beyond one EP rank."""


def default_dispatcher(ep_size: int, dispatch: str = "pairs") -> str:
    """The dispatcher a layer uses when none is named: all local on one rank (nothing crosses a wire in
    either mode), else the one ``dispatch`` names."""
    return DISPATCH_MODES[dispatch] if ep_size > 1 else "local"


def make_dispatcher(name: str, spec: DispatcherSpec) -> Dispatcher:
    """Build the dispatcher registered as ``name``."""
    try:
        cls = _DISPATCHERS[name]
    except KeyError:
        raise ConfigError(f"unknown dispatcher {name!r}; known: {', '.join(dispatcher_names())}") from None
    return cls(spec)


class LocalDispatcher:
    """All experts on this rank: permute, compute, unpermute; no communication."""

    def __init__(self, spec: DispatcherSpec) -> None:
        self.num_experts = spec.num_experts
        self.num_slots = spec.num_experts  # one rank: every expert in exactly one slot
        self.layer = spec.layer
        self.hook = spec.hook
        self.placement = spec.placement

    def set_placement(self, placement: Placement) -> None:
        """One rank: the slot order lives in the route plan alone, so only the record changes."""
        self.placement = placement

    def prepare(self, plan: RoutePlan) -> Tensor | None:
        """Called on the route plan before the balancing all-reduce: the int64 [R] numbers this rank wants
        carried in that all-reduce's dispatch-count block after its N kept-pair counts (then
        ``counts_RN[q][N + r]`` is sender q's number for rank r), or None (nothing: one rank)."""
        return None

    def dispatch(
        self, x_TD: Tensor, plan: RoutePlan, counts_RN: list[list[int]] | None = None
    ) -> tuple[Tensor, Tensor, DispatchMeta]:
        K = plan.pair_slot_TK.shape[1]
        with stage_range(self.layer, "permute"):
            x_PD = _GatherPairs.apply(x_TD, plan, K)
        return x_PD, plan.counts_Q, DispatchMeta(plan=plan, num_tokens=x_TD.shape[0])

    def dispatch_start(
        self, x_TD: Tensor, plan: RoutePlan, counts_RN: list[list[int]] | None = None, overlap: bool = False
    ) -> PendingDispatch:
        """No communication here: the whole dispatch (nothing to overlap)."""
        return PendingDispatch(done=self.dispatch(x_TD, plan, counts_RN))

    def dispatch_finish(self, pending: PendingDispatch) -> tuple[Tensor, Tensor, DispatchMeta]:
        assert pending.done is not None
        return pending.done

    def combine(self, y_PD: Tensor, gates_TK: Tensor, meta: DispatchMeta) -> Tensor:
        with stage_range(self.layer, "unpermute"):
            y_TKD = _ScatterPairs.apply(y_PD, meta.plan)
            # h_t = sum_k g_tk * FFN_k(u_t): a batched [1,K] x [K,D] product per token
            out_TD = torch.bmm(gates_TK.to(y_TKD.dtype).unsqueeze(1), y_TKD).squeeze(1)
        return out_TD


class AllToAllDispatcher(LocalDispatcher):
    """Expert slots spread over ``group`` by a ``Placement``: tokens travel by uneven all-to-all.

    ``exchange`` is the one communication call (the token all-to-all); a subclass may replace it (the
    no-communication floor of ``profiling/bench/nocomm.py`` does) and keeps every profiler range and timing
    record where it is.

    ``count_rows``: the row of each EP-group member (in EP order) in the [R_balance, N] count block that the
    balancing all-reduce carries; with it, ``dispatch`` takes the splits from that block (``counts_RN``,
    per logical expert) and every sender's route table, and skips the count all-to-all.
    """

    def __init__(self, spec: DispatcherSpec) -> None:
        super().__init__(spec)
        self.group = spec.group  # held weakly (GroupRef): see the property
        self.world = dist.get_world_size(spec.group)
        self.rank = dist.get_rank(spec.group)
        self.count_rows = spec.count_rows
        self.set_placement(spec.placement)

    @property
    def group(self):
        """The EP group; held by weak reference, so that a destroyed process group is really freed."""
        return self._group_ref.get()

    @group.setter
    def group(self, group) -> None:
        self._group_ref = GroupRef(group)

    def exchange(self, x_PD: Tensor, out_splits: list[int], in_splits: list[int], where: str) -> Tensor:
        """Send ``in_splits[r]`` rows to EP rank r, receive ``out_splits[r]`` from it (differentiable)."""
        return all_to_all(x_PD, out_splits, in_splits, self.group, where)

    def set_placement(self, placement: Placement) -> None:
        """Dispatch by ``placement`` from the next call on (``MoELayer.set_placement`` validates it)."""
        super().set_placement(placement)
        R, L = self.world, placement.slots_per_rank
        self.num_slots = L
        # why every sender's table: all ranks know all tables, so the [R, N] count block alone sizes every
        # buffer; a sender's pairs of expert e all go to one global slot q = r * L + s
        tables = [self.placement.route_table(q) for q in range(R)]
        self._send_to = [divmod(q, L) for q in tables[self.rank]]  # (rank, slot) per logical expert
        # per sender q: (my slot, logical expert) for each expert that q sends to this rank
        self._recv_from = [
            [(q - self.rank * L, e) for e, q in enumerate(t) if q // L == self.rank] for t in tables
        ]

    def prepare(self, plan: RoutePlan) -> Tensor | None:
        """R zeros: "pairs" needs no more than the N counts. why not None: every EP dispatcher folds the
        same [R_balance, N + R] block, so the balancing all-reduce has one layout (and summation order)
        whichever dispatch runs, and "dedup" stays comparable to "pairs" bit for bit where it was."""
        return plan.counts_Q.new_zeros(self.world)

    def _splits(self, plan: RoutePlan, counts_RN: list[list[int]] | None) -> tuple[list, list]:
        """[R][L] rows this rank sends to each rank's slots, and receives from each rank into its slots."""
        R, L = self.world, self.num_slots
        if counts_RN is not None and self.count_rows is not None:
            own = counts_RN[self.count_rows[self.rank]]
            send_RL = [[0] * L for _ in range(R)]
            for e, (r, s) in enumerate(self._send_to):
                send_RL[r][s] = own[e]  # one expert per slot per sender: no sums
            recv_RL = [[0] * L for _ in range(R)]
            for q, pairs in enumerate(self._recv_from):
                row = counts_RN[self.count_rows[q]]
                for s, e in pairs:
                    recv_RL[q][s] = row[e]
            return send_RL, recv_RL
        # why: receivers must size their buffers, so counts go first (the one host sync per layer)
        recv_counts = torch.empty_like(plan.counts_Q)
        with named_collective(f"MoE layer {self.layer}: dispatch count exchange"):
            dist.all_to_all_single(recv_counts, plan.counts_Q.contiguous(), group=self.group)
            # the read-back is where an asynchronous backend (NCCL) actually waits
            send_RL, recv_RL = torch.stack([plan.counts_Q, recv_counts]).view(2, R, L).tolist()
        return send_RL, recv_RL

    def exchange_start(
        self, x_PD: Tensor, out_splits: list[int], in_splits: list[int], where: str, overlap: bool
    ) -> Tensor | PendingAllToAll:
        """``exchange``, or with ``overlap`` the same all-to-all left in flight (``wait_rows`` ends it)."""
        # why the type check: a subclass that replaced ``exchange`` (the no-communication floor) keeps it
        if not overlap or type(self).exchange is not AllToAllDispatcher.exchange:
            return self.exchange(x_PD, out_splits, in_splits, where)
        return all_to_all_start(x_PD, out_splits, in_splits, self.group, where)

    def wait_rows(self, pending: PendingDispatch) -> list[Tensor]:
        """The rows of each of the dispatch's all-to-alls; waits for those in flight, timed as part of the
        dispatch all-to-all (the ``dispatch_wait`` .. ``dispatch_ready`` records around the waits)."""
        assert pending.sent is not None
        if not any(isinstance(p, PendingAllToAll) for p in pending.sent):
            return list(pending.sent)  # type: ignore[arg-type]
        hook = self.hook
        if hook is not None:
            hook.record(self.layer, "fwd", "dispatch_wait")
        with stage_range(self.layer, "dispatch_a2a"):
            rows = [all_to_all_wait(p) if isinstance(p, PendingAllToAll) else p for p in pending.sent]
        if hook is not None:
            hook.record(self.layer, "fwd", "dispatch_ready")
        return rows

    def dispatch(
        self, x_TD: Tensor, plan: RoutePlan, counts_RN: list[list[int]] | None = None
    ) -> tuple[Tensor, Tensor, DispatchMeta]:
        return self.dispatch_finish(self.dispatch_start(x_TD, plan, counts_RN))

    def dispatch_start(
        self, x_TD: Tensor, plan: RoutePlan, counts_RN: list[list[int]] | None = None, overlap: bool = False
    ) -> PendingDispatch:
        x_PD, _, meta = LocalDispatcher.dispatch(self, x_TD, plan)
        hook = self.hook
        if hook is not None:
            hook.record(self.layer, "fwd", "dispatch_start")
        with stage_range(self.layer, "dispatch_a2a"):
            send_RL, recv_RL = self._splits(plan, counts_RN)
            meta.send_splits = [sum(row) for row in send_RL]
            meta.recv_splits = [sum(row) for row in recv_RL]
            where = f"MoE layer {self.layer}: dispatch all-to-all"
            sent = [self.exchange_start(x_PD, meta.recv_splits, meta.send_splits, where, overlap)]
        if hook is not None:
            hook.record(self.layer, "fwd", "dispatch_end")
        meta.wire_rows = sum(meta.send_splits) - meta.send_splits[self.rank]
        meta.wire_bytes = meta.wire_rows * x_PD.shape[1] * x_PD.element_size()
        return PendingDispatch(meta=meta, sent=sent, recv_RL=recv_RL)

    def dispatch_finish(self, pending: PendingDispatch) -> tuple[Tensor, Tensor, DispatchMeta]:
        R, L = self.world, self.num_slots
        (x_PD,) = self.wait_rows(pending)
        meta, recv_RL, hook = pending.meta, pending.recv_RL, self.hook
        assert meta is not None and recv_RL is not None
        with stage_range(self.layer, "permute"):
            # rows arrive grouped (source rank, local slot); experts want (local slot, source rank)
            counts_L = [sum(recv_RL[r][s] for r in range(R)) for s in range(L)]
            if L > 1 and R > 1:
                meta.regroup_idx = _regroup_index(recv_RL, x_PD.device)
                meta.regroup_inv = torch.empty_like(meta.regroup_idx)
                meta.regroup_inv[meta.regroup_idx] = torch.arange(
                    meta.regroup_idx.numel(), device=x_PD.device
                )
                x_PD = permute_rows(x_PD, meta.regroup_idx, meta.regroup_inv)
        if hook is not None:
            hook.tokens(self.layer, x_PD.shape[0])
        x_PD = backward_mark(x_PD, hook, self.layer, "experts_end")
        counts_t = torch.tensor(counts_L, dtype=torch.int64, device=x_PD.device)
        return x_PD, counts_t, meta

    def combine(self, y_PD: Tensor, gates_TK: Tensor, meta: DispatchMeta) -> Tensor:
        y_PD = backward_mark(y_PD, self.hook, self.layer, "experts_start")
        with stage_range(self.layer, "unpermute"):
            if meta.regroup_idx is not None:
                y_PD = permute_rows(y_PD, meta.regroup_inv, meta.regroup_idx)
        y_PD = self.combine_exchange(y_PD, meta.send_splits, meta.recv_splits)
        return super().combine(y_PD, gates_TK, meta)

    def combine_exchange(self, y_XD: Tensor, sent: list[int], recv: list[int]) -> Tensor:
        """The combine all-to-all inside the profiler's combine span (X: the rows on the wire, P for pairs
        and U for dedup)."""
        if self.hook is not None:
            self.hook.record(self.layer, "fwd", "combine_start")
        with stage_range(self.layer, "combine_a2a"):
            y_XD = self.exchange(y_XD, sent, recv, f"MoE layer {self.layer}: combine all-to-all")
        if self.hook is not None:
            self.hook.record(self.layer, "fwd", "combine_end")
        return y_XD


def _regroup_index(recv_RL: list[list[int]], device: torch.device) -> Tensor:
    """Index that reorders chunks laid out (rank r, slot s) into (slot s, rank r)."""
    counts_RL = torch.tensor(recv_RL, dtype=torch.int64)
    flat = counts_RL.flatten()
    starts_RL = (torch.cumsum(flat, 0) - flat).view_as(counts_RL)
    lens_LR = counts_RL.t().flatten()  # chunk lengths in (slot, rank) order
    src_starts = starts_RL.t().flatten()
    dst_starts = torch.cumsum(lens_LR, 0) - lens_LR
    total = int(flat.sum())
    shift = torch.repeat_interleave(src_starts - dst_starts, lens_LR, output_size=total)
    return (shift + torch.arange(total)).to(device)


register_dispatcher("local", LocalDispatcher)
register_dispatcher("all_to_all", AllToAllDispatcher)
