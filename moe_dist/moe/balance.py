"""Balancing terms: the seed's Switch loss alpha * sum f_i P_i, CV^2 penalties, router z-loss, DeepSeek-V3's
sequence-wise loss, and the statistics behind them, reduced over the balance group in ONE all-reduce per
layer.

Shape legend: T tokens, N experts, K top-k, B sequences, S tokens per sequence, R ranks of a group.

Each term is one ``BalanceTerm`` in ``BALANCE_TERMS``: it declares its named blocks of the all-reduce
(``blocks``), reads them back by name (``loss``, ``check``), and ``moe_dist.moe.packing.Packing`` assigns
the offsets. A new term is one class appended there (and its coefficient in ``MoEConfig``).

    f_i = N / (K T) * #{t : i in TopK(t)}      (no gradient; the routing choice before capacity drop;
                                                with aux_loss_counts="unbiased", TopK of s instead)
    P_i = 1/T * sum_t s_{i,t}
    CV^2(z) = (mean(z^2) - mean(z)^2) / mean(z)^2   (population variance, as in the seed)
    z-loss  = mean_t (logsumexp_i logits_{t,i})^2
    seq     = mean_b sum_i f_{b,i} P_{b,i},  f_{b,i} = N/(K S) #{t in b : i in Topk(s_t)},
              P_{b,i} = 1/S sum_{t in b} s_{i,t} / sum_j s_{j,t}       (DeepSeek-V3 eq. 17-20)

TopK(t) is the routing choice (top-K of s + b inside the kept groups); Topk(s_t) is the top-K of the
unbiased scores over all experts, as DeepSeek-V3's eq. 18 and Megatron-Core's
``compute_routing_scores_for_aux_loss`` count. They differ only under a selection bias or a group limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe_dist.errors import NonFiniteError
from moe_dist.moe.comm import all_reduce_sum_scaled_grad
from moe_dist.moe.config import MoEConfig
from moe_dist.moe.packing import GRAD, HOST, Block, HostView, Packing, View
from moe_dist.moe.router import RouterOutput


@dataclass
class MoEStats:
    tokens_per_expert: Tensor
    """int64 [N]: (token, expert) assignments per expert, summed over the balance group."""
    f: Tensor
    """[N]: the seed's normalised load f_i over the balance group (sums to N)."""
    P: Tensor
    """[N]: the seed's mean score P_i over the balance group."""
    dropped: Tensor
    """int64 scalar: (token, expert) pairs dropped by capacity, summed over the balance group."""
    num_tokens: Tensor
    """int64 scalar: tokens seen by the balance group in this call."""
    tokens_per_expert_local: Tensor
    """int64 [N]: this rank's assignments per expert (its micro-batch alone)."""
    wire_rows: int = 0
    """D-wide rows this rank sent to other EP ranks in the dispatch all-to-all (``MoEConfig.dispatch``)."""
    wire_bytes: int = 0
    """Bytes of those rows, plus dedup's (row, gate) pair lists; the small count exchange is not counted."""


@dataclass
class BalanceResult:
    aux_loss: Tensor
    terms: dict[str, Tensor]
    stats: MoEStats
    counts_N: Tensor
    """float64 [N] routed counts over the balance group (the bias-update window adds these)."""
    aux_counts_N: Tensor
    """float64 [N] the counts the Switch loss's f uses over the balance group (``counts_N`` itself unless
    aux_loss_counts="unbiased" and something steers selection; the running-f window adds these)."""
    kept_counts_RN: list[list[int]] | None = None
    """Host copy of every balance-group rank's kept (token, expert) pairs per expert, when the layer asked
    for them (``count_row``): the dispatcher's splits, so no count all-to-all is needed."""


def count_experts(idx_TK: Tensor, n: int) -> Tensor:
    """int64 [n] assignments per expert; scatter_add, because CUDA's bincount syncs with the host."""
    flat = idx_TK.reshape(-1)
    return torch.zeros(n, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def cv_squared(z_N: Tensor) -> Tensor:
    """Seed's CV^2 with the population variance; 0 iff all entries are equal (all zero included: a balance
    group with no tokens at all)."""
    mu = z_N.mean()
    nu = (z_N * z_N).mean()
    mu2 = mu * mu
    # why the clamp under the where: 0/0 would put NaN into the backward too, even on the unused branch
    cv2 = (nu - mu2) / mu2.clamp(min=torch.finfo(mu2.dtype).tiny)
    return torch.where(mu2 > 0, cv2, torch.zeros_like(mu2))


def selection_steered(cfg: MoEConfig) -> bool:
    """Whether routing's top-K can differ from the top-K of the unbiased scores (a bias or a group limit)."""
    grouped = cfg.n_group is not None and cfg.topk_group is not None and cfg.topk_group < cfg.n_group
    return cfg.bias_update_rate > 0 or grouped


def aux_counts_separate(cfg: MoEConfig) -> bool:
    """Whether the Switch loss's counts need their own reduction (they differ from the routed counts)."""
    return cfg.aux_loss_counts == "unbiased" and selection_steered(cfg)


def unbiased_topk_idx(cfg: MoEConfig, route: RouterOutput) -> Tensor:
    """[T, K] top-K of the unbiased scores s over all experts (no bias, no group limit): DeepSeek-V3's
    eq. 18 and Megatron-Core's ``compute_routing_scores_for_aux_loss`` (its s / sum_j s_j has the same
    order per token). The routing choice itself when nothing steers selection."""
    if not selection_steered(cfg):
        return route.topk_idx_TK
    return torch.topk(route.scores_TN.detach(), cfg.top_k, dim=-1).indices


def seq_balance_sum(
    cfg: MoEConfig, route: RouterOutput, seq_len: int, idx_TK: Tensor | None = None
) -> Tensor:
    """sum over this rank's sequences b of sum_i f_{b,i} P_{b,i} (DeepSeek-V3 eq. 17-20), the rows of
    ``route`` being B = T / seq_len sequences laid out back to back. f counts ``idx_TK``, by default the
    top-K of the unbiased scores (eq. 18: neither the selection bias nor the group limit)."""
    N, K = cfg.num_experts, cfg.top_k
    scores_TN = route.scores_TN
    T = scores_TN.shape[0]
    if T == 0:
        return scores_TN.new_zeros(())
    B, S = T // seq_len, seq_len
    idx_TK = unbiased_topk_idx(cfg, route) if idx_TK is None else idx_TK
    idx_BX = idx_TK.reshape(B, S * K)
    counts_BN = torch.zeros(B, N, dtype=torch.int64, device=idx_BX.device).scatter_add_(
        1, idx_BX, torch.ones_like(idx_BX)
    )
    f_BN = counts_BN.to(scores_TN.dtype) * (N / (K * S))
    # s' = s / sum_j s_j (eq. 19); softmax scores already sum to 1, so they are used as they are
    norm_TN = scores_TN if cfg.score_func == "softmax" else scores_TN / scores_TN.sum(-1, keepdim=True)
    P_BN = norm_TN.view(B, S, N).mean(1)
    return (f_BN * P_BN).sum()


# ---- one call's inputs, shared by the terms ---------------------------------------------------------------


@dataclass
class BalanceCall:
    """Everything one ``balance_terms`` call knows, computed once and read by every term."""

    cfg: MoEConfig
    route: RouterOutput
    layer: int
    dropped_local: Tensor
    seq_len: int
    count_row: tuple[int, int] | None
    kept_counts_N: Tensor | None
    window_counts_N: Tensor | None
    window_tokens: Tensor | None
    window_aux_counts_N: Tensor | None
    alpha: Tensor | float
    counts_local_N: Tensor
    """int64 [N]: this rank's routed (token, expert) pairs per expert."""
    aux_counts_local_N: Tensor
    """int64 [N]: this rank's counts for the Switch loss's f (``counts_local_N`` unless separate)."""
    unbiased_idx_TK: Tensor | None
    nonfinite: Tensor

    @property
    def N(self) -> int:
        return self.cfg.num_experts

    @property
    def K(self) -> int:
        return self.cfg.top_k

    @property
    def dtype(self) -> torch.dtype:
        return self.route.scores_TN.dtype

    @property
    def T_local(self) -> int:
        return self.route.scores_TN.shape[0]

    @property
    def n_seq_local(self) -> int:
        return self.T_local // self.seq_len if self.seq_len > 0 else 0

    @property
    def local_scope(self) -> bool:
        return self.cfg.balance_scope == "local"

    def scalar(self, v: float) -> Tensor:
        return torch.tensor([v], dtype=torch.float64, device=self.route.scores_TN.device)


def _tokens(c: BalanceCall, v: View) -> Tensor:
    """The view's token count, clamped to 1, in the scores' dtype."""
    return v["tokens"].clamp(min=1).to(c.dtype)


def _mean_scores(c: BalanceCall, v: View) -> Tensor:
    """P_i = 1/T sum_t s_{i,t} over the view's tokens (one graph node per view)."""
    return v.derived("P", lambda: v["importance"].to(c.dtype) / _tokens(c, v))


def _f_routed_and_switch(c: BalanceCall, glob: View) -> tuple[Tensor, Tensor]:
    """(routed f, the Switch loss's f) under the balance scope; they differ only with separate counts."""
    N, K, dtype = c.N, c.K, c.dtype
    if c.local_scope:
        scale = N / (K * max(c.T_local, 1))
        return c.counts_local_N.to(dtype) * scale, c.aux_counts_local_N.to(dtype) * scale
    T_global = glob["tokens"]
    f_routed_N = glob["counts"].to(dtype) * (N / (K * T_global.clamp(min=1).to(dtype)))
    separate = "aux_counts" in glob
    f_N = (
        glob["aux_counts"].to(dtype) * (N / (K * T_global.clamp(min=1).to(dtype))) if separate else f_routed_N
    )
    if c.cfg.balance_scope == "global_batch" and c.window_counts_N is not None:
        run_T = (c.window_tokens + T_global).clamp(min=1)
        f_routed_N = ((c.window_counts_N + glob["counts"]) * (N / (K * run_T))).to(dtype)
        f_N = f_routed_N
        if separate:
            run_aux = (c.window_aux_counts_N if c.window_aux_counts_N is not None else 0) + glob["aux_counts"]
            f_N = (run_aux * (N / (K * run_T))).to(dtype)
    return f_routed_N, f_N


# ---- the terms ---------------------------------------------------------------------------------------------


class BalanceTerm:
    """One balancing term or statistic: the blocks it adds to the all-reduce, and what it reads back.

    ``blocks`` returns [] when the term is off for this config. ``loss`` gets ``scoped`` (the group's sums,
    or this rank's own under balance_scope="local") and ``glob`` (always the group's), reads its blocks by
    name, and returns its weighted value (None: not a loss). ``check`` may raise after the all-reduce,
    on every rank together.
    """

    name = ""

    def blocks(self, c: BalanceCall) -> list[Block]:
        return []

    def loss(self, c: BalanceCall, scoped: View, glob: View) -> Tensor | None:
        return None

    def check(self, c: BalanceCall, glob: View, host: HostView | None) -> None:
        return None


class Statistics(BalanceTerm):
    """Mean scores (P), routed counts, tokens and drops: what MoEStats and the bias update read."""

    def blocks(self, c: BalanceCall) -> list[Block]:
        return [
            Block("importance", c.route.scores_TN.sum(0), GRAD),
            Block("counts", c.counts_local_N),
            Block("tokens", c.scalar(c.T_local)),
            Block("dropped", c.dropped_local.reshape(1)),
        ]


class NonFiniteFlag(BalanceTerm):
    """Ranks whose router logits hold NaN/Inf: raised on every rank together, before dispatch."""

    def blocks(self, c: BalanceCall) -> list[Block]:
        return [Block("nonfinite", c.nonfinite.reshape(1), HOST)] if c.cfg.check_finite else []

    def check(self, c: BalanceCall, glob: View, host: HostView | None) -> None:
        bad_ranks = int(host["nonfinite"][0]) if host is not None and "nonfinite" in glob else 0
        if bad_ranks:
            here = "yes" if bool(c.nonfinite) else "no"
            raise NonFiniteError(
                f"MoE layer {c.layer}: router logits hold NaN/Inf on {bad_ranks} rank(s) of the balance "
                f"group (this rank: {here}); raised on every rank together, before dispatch"
            )


class DispatchCounts(BalanceTerm):
    """Every rank's kept pairs per expert in an [R, N] block (this rank fills its row): the dispatcher's
    splits, so no count all-to-all is needed."""

    def blocks(self, c: BalanceCall) -> list[Block]:
        if c.count_row is None:
            return []
        row, rows = c.count_row
        # why the counts' own width: N, or N + R when the dispatcher folds its own numbers in (prepare())
        width = c.kept_counts_N.numel()
        block_RN = torch.zeros(rows, width, dtype=torch.float64, device=c.route.scores_TN.device)
        block_RN[row] = c.kept_counts_N.to(torch.float64)
        return [Block("dispatch_counts", block_RN, HOST)]


class Switch(BalanceTerm):
    """alpha * sum_i f_i P_i; with separate (unbiased) counts, f comes from its own block."""

    name = "switch"

    def blocks(self, c: BalanceCall) -> list[Block]:
        if not aux_counts_separate(c.cfg):
            return []
        return [Block("aux_counts", c.aux_counts_local_N)]  # the host never reads them

    def loss(self, c: BalanceCall, scoped: View, glob: View) -> Tensor | None:
        alpha = c.alpha
        if not (isinstance(alpha, Tensor) or alpha > 0):
            return c.route.scores_TN.new_zeros(())
        P_N = _mean_scores(c, scoped)
        return alpha * (_f_routed_and_switch(c, glob)[1].detach() * P_N).sum()


class CVImportance(BalanceTerm):
    name = "cv_importance"

    def loss(self, c: BalanceCall, scoped: View, glob: View) -> Tensor | None:
        if not c.cfg.cv_importance_coef > 0:
            return None
        return c.cfg.cv_importance_coef * cv_squared(_mean_scores(c, scoped))


class CVLoad(BalanceTerm):
    """CV^2 of the smooth load (noisy gating), else of the routed f, which has no gradient: reported, then."""

    name = "cv_load"

    def blocks(self, c: BalanceCall) -> list[Block]:
        load_TN = c.route.load_prob_TN
        return [] if load_TN is None else [Block("load_prob", load_TN.sum(0), GRAD)]

    def loss(self, c: BalanceCall, scoped: View, glob: View) -> Tensor | None:
        if not c.cfg.cv_load_coef > 0:
            return None
        if "load_prob" in scoped:
            load_N = scoped["load_prob"].to(c.dtype) * (c.N / (c.K * _tokens(c, scoped)))
        else:
            # it takes the routed f whatever aux_loss_counts says: it measures the load the experts get
            load_N = _f_routed_and_switch(c, glob)[0].detach()
        return c.cfg.cv_load_coef * cv_squared(load_N)


class ZLoss(BalanceTerm):
    name = "z"

    def blocks(self, c: BalanceCall) -> list[Block]:
        if not c.cfg.z_loss_coef > 0:
            return []
        lse_T = torch.logsumexp(c.route.logits_TN, dim=-1)
        return [Block("z_sum", (lse_T * lse_T).sum().reshape(1), GRAD)]

    def loss(self, c: BalanceCall, scoped: View, glob: View) -> Tensor | None:
        if "z_sum" not in scoped:
            return None
        return c.cfg.z_loss_coef * (scoped["z_sum"].to(c.dtype) / _tokens(c, scoped))


class SeqLoss(BalanceTerm):
    """Mean over the balance group's sequences (this rank's under "local") of sum_i f_{b,i} P_{b,i}."""

    name = "seq"

    def blocks(self, c: BalanceCall) -> list[Block]:
        if not c.cfg.seq_aux_loss_coef > 0:
            return []
        seq_sum = seq_balance_sum(c.cfg, c.route, c.seq_len, c.unbiased_idx_TK).reshape(1)
        return [Block("seq_sum", seq_sum, GRAD), Block("sequences", c.scalar(c.n_seq_local))]

    def loss(self, c: BalanceCall, scoped: View, glob: View) -> Tensor | None:
        if "seq_sum" not in scoped:
            return None
        seq = scoped["seq_sum"].to(c.dtype) / scoped["sequences"].clamp(min=1).to(c.dtype)
        return c.cfg.seq_aux_loss_coef * seq


BALANCE_TERMS: list[BalanceTerm] = [
    Statistics(),
    NonFiniteFlag(),
    DispatchCounts(),
    Switch(),
    CVImportance(),
    CVLoad(),
    ZLoss(),
    SeqLoss(),
]
"""Every term, in the order of MoEOutput.terms (a new term: one class here, plus its MoEConfig field)."""


def balance_terms(
    cfg: MoEConfig,
    route: RouterOutput,
    dropped_local: Tensor,
    group,
    layer: int,
    window_counts_N: Tensor | None = None,
    window_tokens: Tensor | None = None,
    alpha: Tensor | float | None = None,
    seq_len: int | None = None,
    count_row: tuple[int, int] | None = None,
    kept_counts_N: Tensor | None = None,
    window_aux_counts_N: Tensor | None = None,
) -> BalanceResult:
    """Compute every balancing term, pooled over ``group`` (None: this rank only).

    ``alpha`` overrides cfg.aux_loss_coef (the layer's controller-set buffer).
    ``window_counts_N``/``window_tokens`` are the running global counts of earlier micro-batches of the
    step; with balance_scope="global_batch", f_i is taken over them plus this call.
    ``window_aux_counts_N``: the same running window of the Switch loss's own counts, used when
    aux_loss_counts="unbiased" makes them differ from the routed ones (``aux_counts_separate``).
    ``seq_len``: tokens per sequence for the sequence-wise loss (None: all rows are one sequence). Its
    mean over sequences is taken over the balance group's sequences (this rank's under "local" scope).
    ``count_row`` = (this rank's row, rows in ``group``): ``kept_counts_N`` rides the same all-reduce in
    this rank's row of an [R, N] block, so every rank learns every rank's dispatch counts.
    """
    N = cfg.num_experts
    scores_TN = route.scores_TN
    dtype = scores_TN.dtype
    T_local = scores_TN.shape[0]
    counts_local_N = count_experts(route.topk_idx_TK, N)
    nonfinite = (
        (~torch.isfinite(route.logits_TN)).any()
        if cfg.check_finite
        else scores_TN.new_zeros((), dtype=torch.bool)
    )
    separate = aux_counts_separate(cfg)
    want_unbiased = cfg.seq_aux_loss_coef > 0 or separate
    unbiased_idx_TK = unbiased_topk_idx(cfg, route) if want_unbiased else None
    if alpha is None:
        alpha = cfg.initial_alpha
    elif isinstance(alpha, Tensor):  # set by a controller; no host sync, and the loss keeps its dtype
        alpha = alpha.to(dtype)
    c = BalanceCall(
        cfg=cfg,
        route=route,
        layer=layer,
        dropped_local=dropped_local,
        seq_len=T_local if seq_len is None else seq_len,
        count_row=count_row,
        kept_counts_N=kept_counts_N,
        window_counts_N=window_counts_N,
        window_tokens=window_tokens,
        window_aux_counts_N=window_aux_counts_N,
        alpha=alpha,
        counts_local_N=counts_local_N,
        aux_counts_local_N=count_experts(unbiased_idx_TK, N) if separate else counts_local_N,
        unbiased_idx_TK=unbiased_idx_TK,
        nonfinite=nonfinite,
    )
    packing = Packing([b for term in BALANCE_TERMS for b in term.blocks(c)])
    local_vec = packing.pack()
    # one collective per layer carries the stats, the gradient-carrying sums and the non-finite flag
    where = f"MoE layer {layer}: router statistics all-reduce"
    global_vec = all_reduce_sum_scaled_grad(local_vec, group, where) if group is not None else local_vec
    glob = packing.view(global_vec)
    # why one read-back: the non-finite flag and the dispatch counts share the layer's one host sync
    host = glob.host() if packing.host_start < global_vec.numel() else None
    for term in BALANCE_TERMS:
        term.check(c, glob, host)
    scoped = packing.view(local_vec) if c.local_scope else glob

    terms: dict[str, Tensor] = {}
    for term in BALANCE_TERMS:
        value = term.loss(c, scoped, glob)
        if value is not None:
            terms[term.name] = value
    aux = sum(terms.values(), scores_TN.new_zeros(()))

    counts_N, T_global = glob["counts"], glob["tokens"]
    f_glob = counts_N.to(dtype) * (N / (c.K * T_global.clamp(min=1).to(dtype)))
    stats = MoEStats(
        tokens_per_expert=counts_N.round().to(torch.int64),
        f=f_glob.detach(),
        P=_mean_scores(c, glob).detach(),
        dropped=glob["dropped"].round().to(torch.int64),
        num_tokens=T_global.round().to(torch.int64),
        tokens_per_expert_local=counts_local_N,
    )
    kept_counts_RN = None
    if count_row is not None:
        flat = [int(round(v)) for v in host["dispatch_counts"]]
        W = len(flat) // count_row[1]  # N kept-pair counts, then any the dispatcher folded in
        kept_counts_RN = [flat[r * W : (r + 1) * W] for r in range(count_row[1])]
    return BalanceResult(
        aux_loss=aux,
        terms=terms,
        stats=stats,
        counts_N=counts_N,
        aux_counts_N=glob["aux_counts"] if "aux_counts" in glob else counts_N,
        kept_counts_RN=kept_counts_RN,
    )
