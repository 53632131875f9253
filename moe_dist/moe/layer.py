"""The MoE layer: h = u + sum_i g_i FFN_i(u) [+ shared(u)] (the seed, plus DeepSeek-V3/Qwen2-MoE shared
experts), expert-parallel over an optional EP group.

Shape legend: T tokens, D model dim, N logical experts, K top-k, L local slots, Q global slots (EP size x L),
P dispatched rows, S tokens per sequence.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_dist.errors import ConfigError
from moe_dist.moe.balance import BalanceResult, MoEStats, balance_terms
from moe_dist.moe.comm import GroupRef
from moe_dist.moe.config import MoEConfig
from moe_dist.moe.dedup import DedupDispatcher  # noqa: F401  (registers "dedup")
from moe_dist.moe.dispatcher import (
    Dispatcher,
    DispatcherSpec,
    default_dispatcher,
    make_dispatcher,
    plan_routes,
)
from moe_dist.moe.experts import GroupedExperts, SharedExperts
from moe_dist.moe.placement import Placement
from moe_dist.moe.router import Router
from moe_dist.moe.timing import TimingHook, stage_range
from moe_dist.runtime.teardown import destroy_process_groups_at_exit

log = logging.getLogger(__name__)


@dataclass
class MoEOutput:
    hidden: Tensor
    """Same shape as the input."""
    aux_loss: Tensor
    """Sum of the enabled balancing terms (the global value under global scopes, equal on every rank)."""
    terms: dict[str, Tensor]
    """Each enabled term by name: switch, cv_importance, cv_load, z, seq."""
    stats: MoEStats


# Largest [R_balance, N] dispatch-count block carried by the balancing all-reduce (see MoELayer._count_rows).
MAX_FOLDED_COUNTS = 1 << 16


class MoELayer(nn.Module):
    """Route -> dispatch -> experts -> combine.

    Args:
        cfg: the layer's config.
        ep_group: ranks the experts are spread across (by ``placement``); None = all local.
        balance_group: ranks whose tokens are pooled for f_i and P_i; None = no pooling.
        layer_idx: names the layer in profiler ranges, timing records and errors.
        timing_hook: the profiler's hook (see ``moe_dist.moe.timing``); None = no timing.
        init_seed: seeds each expert's own init generator with (init_seed, layer_idx, expert id); None = the
            seed last given to ``torch.manual_seed``.
        placement: which logical expert each of the EP group's slots holds (``moe_dist.moe.placement``),
        the same
            on every rank of the group; None = ``Placement.contiguous(N, EP size)``, N/R experts per rank.
        dispatcher: the name of a registered dispatcher (``moe_dist.moe.dispatcher.register_dispatcher``);
            None = "local" on one EP rank, beyond it the one ``cfg.dispatch`` names ("pairs": "all_to_all",
            "dedup": "dedup").

    Placement-related attributes: ``placement``, ``slot_experts`` (the logical id of each local slot, i.e.
    of each row of ``experts.w1``/``w2``), ``owned_slots`` (local slots holding the first replica of their
    expert: what a checkpoint writes and the grad norm counts), ``ep_group``, ``ep_rank``, ``ep_size``.
    """

    def __init__(
        self,
        cfg: MoEConfig,
        ep_group=None,
        balance_group=None,
        layer_idx: int = 0,
        timing_hook: TimingHook | None = None,
        init_seed: int | None = None,
        placement: Placement | None = None,
        dispatcher: str | None = None,
    ) -> None:
        super().__init__()
        self.cfg, self.layer_idx, self.balance_group = cfg, layer_idx, balance_group
        ep_size = dist.get_world_size(ep_group) if ep_group is not None else 1
        if cfg.num_experts % ep_size:
            raise ConfigError(
                f"moe.num_experts={cfg.num_experts} is not divisible by the EP group size {ep_size}"
            )
        ep_rank = dist.get_rank(ep_group) if ep_group is not None else 0
        if placement is None:
            placement = Placement.contiguous(cfg.num_experts, ep_size)
        if placement.num_experts != cfg.num_experts or placement.ep != ep_size:
            raise ConfigError(
                f"MoE layer {layer_idx}: the placement is for {placement.num_experts} experts over "
                f"{placement.ep} EP rank(s), but the layer has {cfg.num_experts} over {ep_size}"
            )
        self.ep_group, self.ep_size, self.ep_rank = ep_group, ep_size, ep_rank
        self.placement = placement
        self.slot_experts: list[int] = list(placement.slot_expert_RL[ep_rank])
        self.owned_slots: list[int] = placement.owned_slots(ep_rank)
        self.router = Router(cfg)
        self.experts = GroupedExperts(len(self.slot_experts), cfg.d_model, cfg.d_ff, cfg.activation)
        # why initial_seed by default: the seed the caller gave torch.manual_seed (the trainer's train.seed),
        # read without drawing from the global stream, so dense init does not depend on the EP size either
        self.experts.init_experts(
            self.slot_experts, torch.initial_seed() if init_seed is None else init_seed, layer_idx
        )
        # the global slot this rank sends each logical expert's pairs to (one gather per forward)
        self.register_buffer(
            "route_slot_N",
            torch.tensor(placement.route_table(ep_rank), dtype=torch.int64),
            persistent=False,
        )
        # the rebalance window: kept pairs this rank sent to each logical expert (training forwards) since
        # the owner last zeroed it. why fp64: integer counts stay exact (to 2^53) under any summation order
        self.register_buffer(
            "sent_counts_N", torch.zeros(cfg.num_experts, dtype=torch.float64), persistent=False
        )
        # dense, replicated: outside ``self.experts`` so expert_params (EP-local grads) leaves it out
        self.shared_experts: SharedExperts | None = None
        if cfg.num_shared_experts > 0:
            self.shared_experts = SharedExperts(
                cfg.d_model, cfg.shared_width, cfg.activation, cfg.shared_expert_gate
            )
        self.count_row: tuple[int, int] | None = None
        count_rows = None
        if ep_group is not None and ep_size > 1:
            count_rows = self._count_rows(ep_group, balance_group, cfg.num_experts + ep_size)
        spec = DispatcherSpec(cfg.num_experts, placement, ep_group, layer_idx, timing_hook, count_rows)
        self.dispatcher: Dispatcher = make_dispatcher(
            dispatcher or default_dispatcher(ep_size, cfg.dispatch), spec
        )
        self.timing_hook = timing_hook
        if ep_group is not None or balance_group is not None:
            # why: this layer will issue collectives; gloo groups left alive at interpreter exit can abort it
            destroy_process_groups_at_exit()
        # counting window of one optimizer step: global counts for the bias update and running f
        self.register_buffer(
            "window_counts", torch.zeros(cfg.num_experts, dtype=torch.float64), persistent=False
        )
        self.register_buffer("window_tokens", torch.zeros((), dtype=torch.float64), persistent=False)
        # the Switch loss's own counts over the same window (aux_loss_counts="unbiased" under a bias or
        # group limit); read as empty whenever window_tokens is 0, so every reset of the window resets it
        self.register_buffer(
            "window_aux_counts", torch.zeros(cfg.num_experts, dtype=torch.float64), persistent=False
        )
        # alpha of the Switch loss as state: a balance controller may change it, and checkpoints keep it
        self.register_buffer("aux_coef", torch.tensor(cfg.initial_alpha, dtype=torch.float64))
        if cfg.cv_load_coef > 0 and not cfg.noisy_gating:
            # warnings (not logging) so that it shows once per process, not once per layer
            warnings.warn(
                "moe.cv_load_coef > 0 without noisy_gating: CV^2(f) of a hard top-K has no "
                "gradient, so it is reported but trains nothing",
                stacklevel=2,
            )

    # why weak references (GroupRef): the layer must hold nothing of gloo's past dist.destroy_process_group(),
    # or the destroyed groups' threads live on into interpreter finalization and can abort the exit
    @property
    def ep_group(self):
        """The EP group (None: all experts local)."""
        return self._ep_group_ref.get()

    @ep_group.setter
    def ep_group(self, group) -> None:
        self._ep_group_ref = GroupRef(group)

    @property
    def balance_group(self):
        """The group whose tokens f_i and P_i pool (None: this rank only)."""
        return self._balance_group_ref.get()

    @balance_group.setter
    def balance_group(self, group) -> None:
        self._balance_group_ref = GroupRef(group)

    def set_placement(self, placement: Placement) -> None:
        """Switch to ``placement``: the slot table, owned slots, route table and the dispatcher's splits. The
        slot tensors (weights, optimizer state) are not touched:
        ``moe_dist.placement.migrate.migrate_layers`` moves
        them and then calls this; a checkpoint load calls it before reading the slots by expert id.

        The number of experts, EP ranks and slots per rank must stay: the stacked slots keep their shape.
        """
        old = self.placement
        if placement.shape != old.shape:
            raise ConfigError(
                f"MoE layer {self.layer_idx}: a new placement must keep {old.num_experts} experts over "
                f"{old.ep} EP rank(s) x {old.slots_per_rank} slots, got {placement.num_experts} over "
                f"{placement.ep} x {placement.slots_per_rank}"
            )
        self.placement = placement
        self.slot_experts = list(placement.slot_expert_RL[self.ep_rank])
        self.owned_slots = placement.owned_slots(self.ep_rank)
        table = torch.tensor(placement.route_table(self.ep_rank), dtype=torch.int64)
        self.route_slot_N.copy_(table)  # why copy_: the buffer keeps its device
        self.dispatcher.set_placement(placement)

    def _count_rows(self, ep_group, balance_group, width: int) -> list[int] | None:
        """Rows of the EP-group members in the balance group, when the dispatch counts can ride the
        balancing all-reduce (one collective per layer fewer); None keeps the count all-to-all.

        why a size cap: the block is R_balance x ``width`` (N + R) numbers on every rank; past ~64k (0.5 MB
        of fp64 per layer) a count all-to-all of N numbers is the cheaper collective.
        """
        if balance_group is None:
            return None
        bal_ranks = dist.get_process_group_ranks(balance_group)
        ep_ranks = dist.get_process_group_ranks(ep_group)
        if not set(ep_ranks) <= set(bal_ranks) or len(bal_ranks) * width > MAX_FOLDED_COUNTS:
            return None
        self.count_row = (bal_ranks.index(dist.get_rank()), len(bal_ranks))
        return [bal_ranks.index(g) for g in ep_ranks]

    def forward(self, x: Tensor) -> MoEOutput:
        """1. route: scores, top-K and the balancing terms (one all-reduce over the balance group); each
           pair's logical expert is mapped to the slot (replica) this rank sends it to;
        2. dispatch: permute pairs by slot and all-to-all them to the slot's rank; the dense shared
           experts run on every token of this rank before the received rows are read (with
           ``overlap_shared``: while the all-to-all is in flight);
        3. experts: one grouped GEMM per projection over the local slots;
        4. combine: all-to-all back, unpermute, weight by the gates, add the shared output and the residual.

        ``x`` is [..., S, D]: the second-to-last dim is the sequence for the sequence-wise balance loss
        ([B, S, D] from the model; a [T, D] input is one sequence).
        """
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        seq_len = shape[-2] if x.dim() >= 2 else None
        route, plan, bal = self._route(x_TD, seq_len)
        x_in = x_TD
        if torch.is_autocast_enabled(x_TD.device.type):
            # why: under autocast the residual stream stays fp32; the experts and the all-to-alls should run
            # in the autocast dtype (half the bytes on the wire, and grouped_mm on CUDA needs bf16)
            x_in = x_TD.to(torch.get_autocast_dtype(x_TD.device.type))
        pending = self.dispatcher.dispatch_start(x_in, plan, bal.kept_counts_RN, self.cfg.overlap_shared)
        # why between start and finish: the shared experts need none of the received rows, so under
        # overlap_shared they run while the rows' all-to-all is in flight; without it they run at the same
        # place (the same backward order too: bit-equal results either way, and neither phase's expert
        # time E_r holds them)
        shared_TD = self._shared(x_in)
        x_PD, counts_L, meta = self.dispatcher.dispatch_finish(pending)
        bal.stats.wire_rows, bal.stats.wire_bytes = meta.wire_rows, meta.wire_bytes
        y_PD = self._experts(x_PD, counts_L)
        out_TD = self.dispatcher.combine(y_PD, route.gates_TK, meta)
        if shared_TD is not None:
            out_TD = out_TD + shared_TD
        if self.cfg.residual:
            out_TD = x_TD + out_TD
        return MoEOutput(out_TD.reshape(shape), bal.aux_loss, bal.terms, bal.stats)

    def _route(self, x_TD: Tensor, seq_len: int | None = None):
        with stage_range(self.layer_idx, "router"):
            route = self.router(x_TD)
            slot_TK = self.route_slot_N[route.topk_idx_TK]
            Q = self.ep_size * len(self.slot_experts)
            plan = plan_routes(
                slot_TK,
                route.topk_scores_TK,
                Q,
                self.cfg.capacity_factor,
                self.cfg.num_experts,
                route.gates_TK,  # why: "dedup" weights on the receiving rank, so the gates travel out
            )
            # kept pairs per logical expert: each maps to exactly one slot of this rank's route table
            kept_counts_N = plan.counts_Q[self.route_slot_N] if self.count_row is not None else None
            extra_R = self.dispatcher.prepare(plan)  # dedup: its distinct-token rows per destination rank
            if kept_counts_N is not None and extra_R is not None:
                kept_counts_N = torch.cat([kept_counts_N, extra_R])
            # why torch.where (no host sync): whoever zeroes window_tokens has emptied this window too
            window_aux_N = torch.where(self.window_tokens > 0, self.window_aux_counts, 0.0)
            bal: BalanceResult = balance_terms(
                self.cfg,
                route,
                plan.dropped,
                self.balance_group,
                self.layer_idx,
                self.window_counts,
                self.window_tokens,
                self.aux_coef if self.cfg.aux_loss_coef == "auto" else None,  # None: the config's float
                seq_len,
                self.count_row,
                kept_counts_N,
                window_aux_N,
            )
        # why the graph-task check: activation recompute re-runs forward inside backward; counting it
        # again would double the step's counts (torchtitan PR #1593)
        if self.training and torch._C._current_graph_task_id() == -1:
            self.window_counts += bal.counts_N
            self.window_aux_counts.copy_(window_aux_N + bal.aux_counts_N)
            self.window_tokens += bal.stats.num_tokens.to(torch.float64)
            self.sent_counts_N += plan.counts_Q[self.route_slot_N].to(torch.float64)
        return route, plan, bal

    def _experts(self, x_PD: Tensor, counts_L: Tensor) -> Tensor:
        hook = self.timing_hook
        if hook is not None:
            hook.record(self.layer_idx, "fwd", "experts_start")
            hook.expert_delay(self.layer_idx)
        with stage_range(self.layer_idx, "experts"):
            y_PD = self.experts(x_PD, counts_L)
        if hook is not None:
            hook.record(self.layer_idx, "fwd", "experts_end")
        return y_PD

    def _shared(self, x_TD: Tensor) -> Tensor | None:
        if self.shared_experts is None:
            return None
        with stage_range(self.layer_idx, "shared_experts"):
            return self.shared_experts(x_TD)

    @torch.no_grad()
    def update_expert_bias(self) -> Tensor:
        """Once per optimizer step: b_i += gamma * sign(mean_j n_j - n_i) on the step's global counts,
        then open a new counting window. Returns the counts used. With gamma = 0 it only resets.
        """
        counts_N = self.window_counts.clone()
        gamma = self.cfg.bias_update_rate
        if gamma > 0 and float(self.window_tokens) > 0:
            delta = torch.sign(counts_N.mean() - counts_N)
            self.router.expert_bias += (gamma * delta).to(self.router.expert_bias.dtype)
        self.window_counts.zero_()
        self.window_tokens.zero_()
        return counts_N


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def update_expert_biases(model: nn.Module) -> list[Tensor]:
    """Call once per optimizer step, after ``optimizer.step()``: updates every MoE layer's bias."""
    return [m.update_expert_bias() for m in moe_layers(model)]
