"""Token dispatch: permute (local) and all-to-all (communication) as separate steps, one interface.

Shape legend: T tokens, D model dim, K top-k, N experts, L local experts (N / R), R ranks in the EP
group, P (token, expert) pairs kept after capacity (P <= T*K).

``dispatch()`` returns the rows grouped by local expert, their per-expert counts, and a ``DispatchMeta``
that ``combine()`` takes back. ``LocalDispatcher`` runs everything on this rank; ``AllToAllDispatcher``
sends rows to the rank that owns the expert with ``all_to_all_single`` and uneven splits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moe_dist.comm import all_to_all, named_collective, permute_rows
from moe_dist.timing import TimingHook, backward_mark, stage_range


@dataclass
class RoutePlan:
    """Local permutation of (token, expert) pairs into expert-sorted order, with capacity applied."""

    order_P: Tensor
    """Pair index (t*K + k) of each kept pair, sorted by expert (stable; by score within an expert)."""
    pair_slot_TK: Tensor
    """Row of each pair in the sorted buffer, or P (a zero row) when the pair was dropped."""
    counts_N: Tensor
    """int64 [N]: kept pairs per expert on this rank."""
    dropped: Tensor
    """int64 scalar: pairs dropped by capacity on this rank."""
    any_dropped: bool


@dataclass
class DispatchMeta:
    plan: RoutePlan
    num_tokens: int
    send_splits: list[int] | None = None
    recv_splits: list[int] | None = None
    regroup_idx: Tensor | None = None
    regroup_inv: Tensor | None = None


def plan_routes(
    topk_idx_TK: Tensor, topk_scores_TK: Tensor, num_experts: int, capacity_factor: float | None
) -> RoutePlan:
    """Sort pairs by expert; with a capacity, keep each expert's top-C pairs by score on this rank."""
    T, K = topk_idx_TK.shape
    expert_P = topk_idx_TK.reshape(-1)
    counts_N = torch.zeros(num_experts, dtype=torch.int64, device=expert_P.device).scatter_add_(
        0, expert_P, torch.ones_like(expert_P)
    )  # not bincount: it syncs with the host on CUDA
    if capacity_factor is None:
        order = torch.argsort(expert_P, stable=True)
        slot = torch.empty_like(order)
        slot[order] = torch.arange(order.numel(), device=order.device)
        return RoutePlan(order, slot.view(T, K), counts_N, counts_N.new_zeros(()), False)
    capacity = math.ceil(capacity_factor * K * T / num_experts)
    # why two stable sorts: by score (descending), then by expert, so each expert's pairs are best-first
    by_score = torch.argsort(topk_scores_TK.reshape(-1).detach(), descending=True, stable=True)
    order = by_score[torch.argsort(expert_P[by_score], stable=True)]
    starts_N = torch.cumsum(counts_N, 0) - counts_N
    rank_in_expert = torch.arange(order.numel(), device=order.device) - starts_N[expert_P[order]]
    keep = rank_in_expert < capacity
    kept = order[keep]
    kept_counts_N = counts_N.clamp(max=capacity)
    slot = torch.full((T * K,), kept.numel(), dtype=torch.int64, device=order.device)
    slot[kept] = torch.arange(kept.numel(), device=order.device)
    dropped = counts_N.sum() - kept_counts_N.sum()
    return RoutePlan(kept, slot.view(T, K), kept_counts_N, dropped, True)


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
        g = grad_PD.index_select(0, plan.pair_slot_TK.reshape(-1)).view(T, K, -1).sum(1)
        return g, None, None


class _ScatterPairs(torch.autograd.Function):
    """Sorted rows y_PD -> per-pair rows [T, K, D] (zeros for dropped pairs); backward is a gather."""

    @staticmethod
    def forward(ctx, y_PD: Tensor, plan: RoutePlan) -> Tensor:
        ctx.plan = plan
        if plan.any_dropped:
            y_PD = torch.cat([y_PD, y_PD.new_zeros(1, y_PD.shape[1])])
        T, K = plan.pair_slot_TK.shape
        return y_PD.index_select(0, plan.pair_slot_TK.reshape(-1)).view(T, K, -1)

    @staticmethod
    def backward(ctx, grad_TKD: Tensor):
        plan = ctx.plan
        g = grad_TKD.reshape(-1, grad_TKD.shape[-1]).index_select(0, plan.order_P)
        return g, None


class LocalDispatcher:
    """All experts on this rank: permute, compute, unpermute; no communication."""

    def __init__(self, num_experts: int, layer: int = 0, hook: TimingHook | None = None) -> None:
        self.num_experts = num_experts
        self.num_local = num_experts
        self.layer = layer
        self.hook = hook

    def dispatch(
        self, x_TD: Tensor, plan: RoutePlan, counts_RN: list[list[int]] | None = None
    ) -> tuple[Tensor, Tensor, DispatchMeta]:
        K = plan.pair_slot_TK.shape[1]
        with stage_range(self.layer, "permute"):
            x_PD = _GatherPairs.apply(x_TD, plan, K)
        return x_PD, plan.counts_N, DispatchMeta(plan=plan, num_tokens=x_TD.shape[0])

    def combine(self, y_PD: Tensor, gates_TK: Tensor, meta: DispatchMeta) -> Tensor:
        with stage_range(self.layer, "unpermute"):
            y_TKD = _ScatterPairs.apply(y_PD, meta.plan)
            # h_t = sum_k g_tk * FFN_k(u_t): a batched [1,K] x [K,D] product per token
            out_TD = torch.bmm(gates_TK.to(y_TKD.dtype).unsqueeze(1), y_TKD).squeeze(1)
        return out_TD


class AllToAllDispatcher(LocalDispatcher):
    """Experts split contiguously over ``group`` (N/R per rank): tokens travel by uneven all-to-all.

    ``count_rows``: the row of each EP-group member (in EP order) in the [R_balance, N] count block that the
    balancing all-reduce carries; with it, ``dispatch`` takes the splits from that block
    (``counts_RN``) and skips the count all-to-all.
    """

    def __init__(
        self,
        num_experts: int,
        group,
        layer: int = 0,
        hook: TimingHook | None = None,
        count_rows: list[int] | None = None,
    ) -> None:
        super().__init__(num_experts, layer, hook)
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_local = num_experts // self.world
        self.count_rows = count_rows

    def _splits(self, plan: RoutePlan, counts_RN: list[list[int]] | None) -> tuple[list, list]:
        """[R][L] rows this rank sends to each rank's experts, and receives from each rank."""
        R, L = self.world, self.num_local
        if counts_RN is not None and self.count_rows is not None:
            mine = slice(self.rank * L, (self.rank + 1) * L)
            own = counts_RN[self.count_rows[self.rank]]
            send_RL = [own[r * L : (r + 1) * L] for r in range(R)]
            recv_RL = [counts_RN[row][mine] for row in self.count_rows]
            return send_RL, recv_RL
        # why: receivers must size their buffers, so counts go first (the one host sync per layer)
        recv_counts = torch.empty_like(plan.counts_N)
        with named_collective(f"MoE layer {self.layer}: dispatch count exchange"):
            dist.all_to_all_single(recv_counts, plan.counts_N.contiguous(), group=self.group)
            # the read-back is where an asynchronous backend (NCCL) actually waits
            send_RL, recv_RL = torch.stack([plan.counts_N, recv_counts]).view(2, R, L).tolist()
        return send_RL, recv_RL

    def dispatch(
        self, x_TD: Tensor, plan: RoutePlan, counts_RN: list[list[int]] | None = None
    ) -> tuple[Tensor, Tensor, DispatchMeta]:
        R, L = self.world, self.num_local
        x_PD, _, meta = super().dispatch(x_TD, plan)
        hook = self.hook
        if hook is not None:
            hook.record(self.layer, "fwd", "dispatch_start")
        with stage_range(self.layer, "dispatch_a2a"):
            send_RL, recv_RL = self._splits(plan, counts_RN)
            meta.send_splits = [sum(row) for row in send_RL]
            meta.recv_splits = [sum(row) for row in recv_RL]
            x_PD = all_to_all(
                x_PD,
                meta.recv_splits,
                meta.send_splits,
                self.group,
                f"MoE layer {self.layer}: dispatch all-to-all",
            )
        if hook is not None:
            hook.record(self.layer, "fwd", "dispatch_end")
        with stage_range(self.layer, "permute"):
            # rows arrive grouped (source rank, local expert); experts want (local expert, source rank)
            counts_L = [sum(recv_RL[r][e] for r in range(R)) for e in range(L)]
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
        if self.hook is not None:
            self.hook.record(self.layer, "fwd", "combine_start")
        with stage_range(self.layer, "combine_a2a"):
            y_PD = all_to_all(
                y_PD,
                meta.send_splits,
                meta.recv_splits,
                self.group,
                f"MoE layer {self.layer}: combine all-to-all",
            )
        if self.hook is not None:
            self.hook.record(self.layer, "fwd", "combine_end")
        return super().combine(y_PD, gates_TK, meta)


def _regroup_index(recv_RL: list[list[int]], device: torch.device) -> Tensor:
    """Index that reorders chunks laid out (rank r, expert e) into (expert e, rank r)."""
    counts_RL = torch.tensor(recv_RL, dtype=torch.int64)
    flat = counts_RL.flatten()
    starts_RL = (torch.cumsum(flat, 0) - flat).view_as(counts_RL)
    lens_E = counts_RL.t().flatten()  # chunk lengths in (expert, rank) order
    src_starts = starts_RL.t().flatten()
    dst_starts = torch.cumsum(lens_E, 0) - lens_E
    total = int(flat.sum())
    shift = torch.repeat_interleave(src_starts - dst_starts, lens_E, output_size=total)
    return (shift + torch.arange(total)).to(device)
