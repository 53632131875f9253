"""The "dedup" dispatcher (``MoEConfig.dispatch``): each token crosses to a rank once.

Shape legend: T tokens, D model dim, K top-k, R ranks in the EP group, L local slots per rank, P kept
(token, expert) pairs, U token rows (one per (token, destination rank) with a kept pair there).

A sender packs each token ONCE per destination rank (rows sorted by rank, then token) and sends with it the
list of its kept pairs there: (row in that rank's block, gate), in the plan's slot order, in the gates'
dtype (``pair_list_dtype``: 8 bytes a pair for fp32 gates). The receiver
expands the rows into the pairs its local slots compute (grouped by slot, as the experts want), and on the
way back weights each pair's output by its gate and sums a token's pairs into one row before the combine
all-to-all; the sender adds its token's rows from every rank. The gate multiply therefore happens on the
receiving side, and the gates travel (differentiably) with the pair lists. Counts, capacity drops, replicas
and placements are the route plan's, exactly as for "pairs".

Collectives per forward, as many as "pairs": the token rows with their pair lists in ONE all-to-all (each
destination's rows, then its pair list, flat in one buffer, when the pair lists' dtype is the rows': fp32 or
fp64; else two, e.g. bf16 rows under autocast), and the combine rows; backward reverses both. The receive
sizes come from the balancing all-reduce, as the pairs' do: ``prepare`` groups the pairs into token rows
(a [R, T] mask, no sort) before it, and its R row counts ride the all-reduce's dispatch-count block; where
the counts are not folded, one count exchange of [R, L + 1] numbers. Timing records and profiler ranges sit
where ``AllToAllDispatcher`` puts them: everything on the wire inside ``dispatch_a2a`` / ``combine_a2a``, the
expand and the reduce in ``permute`` / ``unpermute`` (the grouping in ``router``, where ``prepare`` runs),
the backward marks around the expert compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moe_dist.moe.comm import named_collective
from moe_dist.moe.dispatcher import (
    AllToAllDispatcher,
    DispatchMeta,
    PendingDispatch,
    RoutePlan,
    _regroup_index,
    register_dispatcher,
)
from moe_dist.moe.timing import backward_mark, stage_range


def pair_list_dtype(gate_dtype: torch.dtype, num_tokens: int) -> torch.dtype:
    """The dtype of the (row, gate) pair lists: the gates' own (fp32 from our router: 8 bytes a pair), or
    fp64 (16 bytes) for fp64 gates and for more than 2^24 tokens.

    why exact: a gate travels in its own dtype (no rounding, and its gradient comes back in it), and a row
    number below 2^24 (< T) is an exact fp32 integer; a narrower gate dtype (bf16) is widened to fp32.
    """
    dtype = torch.promote_types(gate_dtype, torch.float32)
    if dtype == torch.float32 and num_tokens > 1 << 24:
        return torch.float64
    return dtype


@dataclass
class TokenRows:
    """A route plan's token rows for dedup (``token_rows``): one per (destination rank, token) with a kept
    pair there, sorted by rank, then token."""

    tok_U: Tensor
    """The token of each row."""
    sent_R: Tensor
    """int64 [R]: rows per destination rank."""
    row_P: Tensor
    """Each kept pair's (slot order) row inside its destination rank's block."""


def token_rows(plan: RoutePlan, R: int, L: int) -> TokenRows:
    """Group the plan's kept pairs into token rows.

    why a [R, T] mask and not ``torch.unique``: marking, one cumsum and ``nonzero`` are linear, with no sort
    (the order is the same: nonzero walks the mask by rank, then token).
    """
    T, K = plan.pair_slot_TK.shape
    dev = plan.order_P.device
    slot_P = torch.repeat_interleave(
        torch.arange(R * L, device=dev), plan.counts_Q, output_size=plan.order_P.numel()
    )
    rank_P, tok_P = slot_P // L, plan.order_P // K
    mask_RT = torch.zeros(R, T, dtype=torch.bool, device=dev)
    mask_RT[rank_P, tok_P] = True
    row_RT = torch.cumsum(mask_RT, 1) - 1
    return TokenRows(
        tok_U=mask_RT.nonzero()[:, 1], sent_R=mask_RT.sum(1, dtype=torch.int64), row_P=row_RT[rank_P, tok_P]
    )


class DedupMeta(DispatchMeta):
    """``DispatchMeta`` plus what the dedup combine needs (set by ``DedupDispatcher.dispatch``)."""

    tok_U: Tensor
    """This rank's token of each row it sent, in send order."""
    row_P: Tensor
    """Received side: the row (in the received token block) of each expert input row."""
    gate_P: Tensor
    """Received side: the gate of each expert input row (differentiable back to the sender's gates)."""
    rows_sent: list[int]
    rows_recv: list[int]
    width: int
    """D of the rows (to cut the one all-to-all's flat buffer back into rows and pair lists)."""


class DedupDispatcher(AllToAllDispatcher):
    """One row per (token, destination rank); the pairs are expanded and reduced on the receiving rank."""

    def prepare(self, plan: RoutePlan) -> Tensor | None:
        """The token rows per destination rank: folded into the balancing all-reduce (as the pairs' counts
        are), they size every receive buffer without a count all-to-all."""
        plan.prepared = token_rows(plan, self.world, self.num_slots)
        return plan.prepared.sent_R

    def dispatch_start(
        self, x_TD: Tensor, plan: RoutePlan, counts_RN: list[list[int]] | None = None, overlap: bool = False
    ) -> PendingDispatch:
        R, L = self.world, self.num_slots
        T = plan.pair_slot_TK.shape[0]
        if plan.gates_TK is None:
            raise ValueError("dedup needs the gates in the route plan (plan_routes(gates_TK=...))")
        meta = DedupMeta(plan=plan, num_tokens=T)
        with stage_range(self.layer, "permute"):
            rows = plan.prepared if isinstance(plan.prepared, TokenRows) else token_rows(plan, R, L)
            meta.tok_U = rows.tok_U
            # each pair's row inside its destination rank's block, and its gate, as one list
            gate_P = plan.gates_TK.reshape(-1)[plan.order_P]
            dtype = pair_list_dtype(gate_P.dtype, T)
            pairs_P2 = torch.stack([rows.row_P.to(dtype), gate_P.to(dtype)], 1)
            x_UD = x_TD.index_select(0, meta.tok_U)
            meta.width = D = x_UD.shape[1]
        hook = self.hook
        if hook is not None:
            hook.record(self.layer, "fwd", "dispatch_start")
        with stage_range(self.layer, "dispatch_a2a"):
            splits = self._dedup_splits(plan, rows.sent_R, counts_RN)
            send_RL, recv_RL, meta.rows_sent, meta.rows_recv = splits
            meta.send_splits = [sum(row) for row in send_RL]
            meta.recv_splits = [sum(row) for row in recv_RL]
            where = f"MoE layer {self.layer}: dispatch all-to-all"
            if dtype == x_UD.dtype:
                # why one all-to-all: each destination's rows, then its pair list, flat in one buffer (one
                # collective's latency instead of two; the same dtype, so nothing is rounded)
                rows_at, pairs_at = x_UD.split(meta.rows_sent), pairs_P2.split(meta.send_splits)
                flat = torch.cat([t.reshape(-1) for r in range(R) for t in (rows_at[r], pairs_at[r])])
                in_n = [u * D + 2 * p for u, p in zip(meta.rows_sent, meta.send_splits, strict=True)]
                out_n = [u * D + 2 * p for u, p in zip(meta.rows_recv, meta.recv_splits, strict=True)]
                sent = [self.exchange_start(flat, out_n, in_n, where, overlap)]
            else:
                # why the pair lists first: their backward (the gates' gradient) then runs after the rows'
                sent = [
                    self.exchange_start(
                        pairs_P2,
                        meta.recv_splits,
                        meta.send_splits,
                        f"MoE layer {self.layer}: dispatch pair lists",
                        overlap,
                    ),
                    self.exchange_start(x_UD, meta.rows_recv, meta.rows_sent, where, overlap),
                ]
        if hook is not None:
            hook.record(self.layer, "fwd", "dispatch_end")
        meta.wire_rows = sum(meta.rows_sent) - meta.rows_sent[self.rank]
        pairs_out = meta.send_splits[self.rank]
        meta.wire_bytes = meta.wire_rows * D * x_UD.element_size() + 2 * dtype.itemsize * (
            sum(meta.send_splits) - pairs_out
        )
        return PendingDispatch(meta=meta, sent=sent, recv_RL=recv_RL)

    def dispatch_finish(self, pending: PendingDispatch) -> tuple[Tensor, Tensor, DispatchMeta]:
        R, L = self.world, self.num_slots
        got = self.wait_rows(pending)
        meta, recv_RL, hook = pending.meta, pending.recv_RL, self.hook
        assert isinstance(meta, DedupMeta) and recv_RL is not None
        with stage_range(self.layer, "permute"):
            if len(got) == 1:  # the one flat buffer: cut each source's block into its rows and its pairs
                D = meta.width
                sizes = [n for q in range(R) for n in (meta.rows_recv[q] * D, 2 * meta.recv_splits[q])]
                parts = got[0].split(sizes)
                x_UD = torch.cat(parts[0::2]).view(sum(meta.rows_recv), D)
                pairs_P2 = torch.cat(parts[1::2]).view(sum(meta.recv_splits), 2)
            else:
                pairs_P2, x_UD = got
            dev = x_UD.device
            # received pairs arrive grouped (source rank, local slot); rows are numbered per source block
            recv_t = torch.tensor(meta.rows_recv, dtype=torch.int64, device=dev)
            src_P = torch.repeat_interleave(
                torch.arange(R, device=dev),
                torch.tensor(meta.recv_splits, dtype=torch.int64, device=dev),
                output_size=pairs_P2.shape[0],
            )
            row_P = pairs_P2[:, 0].detach().to(torch.int64) + (torch.cumsum(recv_t, 0) - recv_t)[src_P]
            gate_P = pairs_P2[:, 1]
            if L > 1 and R > 1:  # experts want (local slot, source rank)
                idx = _regroup_index(recv_RL, dev)
                row_P, gate_P = row_P[idx], gate_P[idx]
            meta.row_P, meta.gate_P = row_P, gate_P
            x_PD = x_UD.index_select(0, row_P)
        if hook is not None:
            hook.tokens(self.layer, x_PD.shape[0])
        x_PD = backward_mark(x_PD, hook, self.layer, "experts_end")
        counts_L = [sum(recv_RL[r][s] for r in range(R)) for s in range(L)]
        return x_PD, torch.tensor(counts_L, dtype=torch.int64, device=dev), meta

    def _dedup_splits(
        self, plan: RoutePlan, sent_R: Tensor, counts_RN: list[list[int]] | None
    ) -> tuple[list, list, list[int], list[int]]:
        """[R][L] pairs sent to / received from each rank's slots, and the token rows sent / received.

        With the counts folded into the balancing all-reduce (``counts_RN``: N pair counts, then ``prepare``'s
        R row counts per sender), no collective; else one count exchange of [R, L + 1] numbers (the folded
        [R, N] pair counts alone do not say how many distinct tokens each sender has for a rank, and
        receivers must size their buffers: the one host sync per layer).
        """
        R, L, N = self.world, self.num_slots, self.num_experts
        if counts_RN is not None and self.count_rows is not None and len(counts_RN[0]) == N + R:
            send_RL, recv_RL = self._splits(plan, counts_RN)
            rows_sent = counts_RN[self.count_rows[self.rank]][N:]
            rows_recv = [counts_RN[self.count_rows[q]][N + self.rank] for q in range(R)]
            return send_RL, recv_RL, rows_sent, rows_recv
        send_R_L1 = torch.cat([plan.counts_Q.view(R, L), sent_R.view(R, 1)], 1)
        recv_R_L1 = torch.empty_like(send_R_L1)
        with named_collective(f"MoE layer {self.layer}: dispatch count exchange"):
            dist.all_to_all_single(recv_R_L1, send_R_L1.contiguous(), group=self.group)
            send, recv = torch.stack([send_R_L1, recv_R_L1]).tolist()
        return (
            [row[:L] for row in send],
            [row[:L] for row in recv],
            [row[L] for row in send],
            [row[L] for row in recv],
        )

    def combine(self, y_PD: Tensor, gates_TK: Tensor, meta: DispatchMeta) -> Tensor:
        """``gates_TK`` is not read: the gates came along with the pairs (``meta.gate_P``)."""
        assert isinstance(meta, DedupMeta)
        y_PD = backward_mark(y_PD, self.hook, self.layer, "experts_start")
        with stage_range(self.layer, "unpermute"):
            # a token's pairs on this rank, gate-weighted, summed into the one row it arrived as
            y_w_PD = y_PD * meta.gate_P.to(y_PD.dtype).unsqueeze(1)
            y_UD = y_PD.new_zeros(sum(meta.rows_recv), y_PD.shape[1]).index_add(0, meta.row_P, y_w_PD)
        y_UD = self.combine_exchange(y_UD, meta.rows_sent, meta.rows_recv)
        with stage_range(self.layer, "unpermute"):
            out_TD = y_UD.new_zeros(meta.num_tokens, y_UD.shape[1]).index_add(0, meta.tok_U, y_UD)
        return out_TD


register_dispatcher("dedup", DedupDispatcher)
