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

Collectives per forward: the count exchange ([R, L + 1] numbers), the pair lists, the token rows, and the
combine rows; backward reverses the last three. Timing records and profiler ranges sit where
``AllToAllDispatcher`` puts them: everything on the wire inside ``dispatch_a2a`` / ``combine_a2a``, the
expand and the reduce in ``permute`` / ``unpermute``, the backward marks around the expert compute.
"""

from __future__ import annotations

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


class DedupDispatcher(AllToAllDispatcher):
    """One row per (token, destination rank); the pairs are expanded and reduced on the receiving rank."""

    def dispatch_start(
        self, x_TD: Tensor, plan: RoutePlan, counts_RN: list[list[int]] | None = None, overlap: bool = False
    ) -> PendingDispatch:
        R, L = self.world, self.num_slots
        T, K = plan.pair_slot_TK.shape
        if plan.gates_TK is None:
            raise ValueError("dedup needs the gates in the route plan (plan_routes(gates_TK=...))")
        dev = x_TD.device
        meta = DedupMeta(plan=plan, num_tokens=T)
        with stage_range(self.layer, "permute"):
            # kept pairs in slot order: their global slot, destination rank and token
            slot_P = torch.repeat_interleave(
                torch.arange(R * L, device=dev), plan.counts_Q, output_size=plan.order_P.numel()
            )
            rank_P = slot_P // L
            tok_P = plan.order_P // K
            # why rank * T + token: unique() sorts by it, so the rows come out grouped by destination rank
            key_U, row_of_P = torch.unique(rank_P * max(T, 1) + tok_P, sorted=True, return_inverse=True)
            meta.tok_U = key_U % max(T, 1)
            sent_U_R = torch.zeros(R, dtype=torch.int64, device=dev).scatter_add_(
                0, key_U // max(T, 1), torch.ones_like(key_U)
            )
            # each pair's row inside its destination rank's block, and its gate, as one list
            row_in_block_P = row_of_P - (torch.cumsum(sent_U_R, 0) - sent_U_R)[rank_P]
            gate_P = plan.gates_TK.reshape(-1)[plan.order_P]
            dtype = pair_list_dtype(gate_P.dtype, T)
            pairs_P2 = torch.stack([row_in_block_P.to(dtype), gate_P.to(dtype)], 1)
            x_UD = x_TD.index_select(0, meta.tok_U)
        hook = self.hook
        if hook is not None:
            hook.record(self.layer, "fwd", "dispatch_start")
        with stage_range(self.layer, "dispatch_a2a"):
            send_RL, recv_RL, meta.rows_sent, meta.rows_recv = self._dedup_splits(plan, sent_U_R)
            meta.send_splits = [sum(row) for row in send_RL]
            meta.recv_splits = [sum(row) for row in recv_RL]
            # why the pair lists first: their backward (the gates' gradient) then runs after the rows'
            sent = [
                self.exchange_start(
                    pairs_P2,
                    meta.recv_splits,
                    meta.send_splits,
                    f"MoE layer {self.layer}: dispatch pair lists",
                    overlap,
                ),
                self.exchange_start(
                    x_UD,
                    meta.rows_recv,
                    meta.rows_sent,
                    f"MoE layer {self.layer}: dispatch all-to-all",
                    overlap,
                ),
            ]
        if hook is not None:
            hook.record(self.layer, "fwd", "dispatch_end")
        meta.wire_rows = sum(meta.rows_sent) - meta.rows_sent[self.rank]
        pairs_out = meta.send_splits[self.rank]
        meta.wire_bytes = meta.wire_rows * x_UD.shape[1] * x_UD.element_size() + 2 * dtype.itemsize * (
            sum(meta.send_splits) - pairs_out
        )
        return PendingDispatch(meta=meta, sent=sent, recv_RL=recv_RL)

    def dispatch_finish(self, pending: PendingDispatch) -> tuple[Tensor, Tensor, DispatchMeta]:
        R, L = self.world, self.num_slots
        pairs_P2, x_UD = self.wait_rows(pending)
        meta, recv_RL, hook = pending.meta, pending.recv_RL, self.hook
        assert isinstance(meta, DedupMeta) and recv_RL is not None
        dev = x_UD.device
        with stage_range(self.layer, "permute"):
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

    def _dedup_splits(self, plan: RoutePlan, sent_U_R: Tensor) -> tuple[list, list, list[int], list[int]]:
        """[R][L] pairs sent to / received from each rank's slots, and the token rows sent / received.

        why always a count exchange: the folded [R, N] pair counts do not say how many distinct tokens
        each sender has for a rank, and receivers must size their buffers (the one host sync per layer).
        """
        R, L = self.world, self.num_slots
        send_R_L1 = torch.cat([plan.counts_Q.view(R, L), sent_U_R.view(R, 1)], 1)
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
        if self.hook is not None:
            self.hook.record(self.layer, "fwd", "combine_start")
        with stage_range(self.layer, "combine_a2a"):
            y_UD = self.exchange(
                y_UD, meta.rows_sent, meta.rows_recv, f"MoE layer {self.layer}: combine all-to-all"
            )
        if self.hook is not None:
            self.hook.record(self.layer, "fwd", "combine_end")
        with stage_range(self.layer, "unpermute"):
            out_TD = y_UD.new_zeros(meta.num_tokens, y_UD.shape[1]).index_add(0, meta.tok_U, y_UD)
        return out_TD


register_dispatcher("dedup", DedupDispatcher)
