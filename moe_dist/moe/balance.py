"""Balancing terms: the seed's Switch loss alpha * sum f_i P_i, CV^2 penalties, router z-loss, DeepSeek-V3's
sequence-wise loss, and the statistics behind them, reduced over the balance group in ONE all-reduce per
layer.

Shape legend: T tokens, N experts, K top-k, B sequences, S tokens per sequence.

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
    N, K = cfg.num_experts, cfg.top_k
    scores_TN = route.scores_TN
    dtype = scores_TN.dtype
    T_local = scores_TN.shape[0]
    # why int64 counts (then fp64 for the packed reduce, exact to 2^53): bf16 counts flip bias signs
    counts_local_N = count_experts(route.topk_idx_TK, N)
    nonfinite = (
        (~torch.isfinite(route.logits_TN)).any()
        if cfg.check_finite
        else scores_TN.new_zeros((), dtype=torch.bool)
    )

    diff_parts = [scores_TN.sum(0)]
    want_z = cfg.z_loss_coef > 0
    if want_z:
        lse_T = torch.logsumexp(route.logits_TN, dim=-1)
        diff_parts.append((lse_T * lse_T).sum().reshape(1))
    if route.load_prob_TN is not None:
        diff_parts.append(route.load_prob_TN.sum(0))
    want_seq = cfg.seq_aux_loss_coef > 0
    seq_len = T_local if seq_len is None else seq_len
    n_seq_local = T_local // seq_len if seq_len > 0 else 0
    separate = aux_counts_separate(cfg)
    unbiased_idx_TK = unbiased_topk_idx(cfg, route) if want_seq or separate else None
    if want_seq:
        diff_parts.append(seq_balance_sum(cfg, route, seq_len, unbiased_idx_TK).reshape(1))
    diff_local = torch.cat(diff_parts).to(torch.float64)
    plain_local = torch.cat(
        [
            counts_local_N.to(torch.float64),
            torch.tensor([T_local], dtype=torch.float64, device=scores_TN.device),
            dropped_local.to(torch.float64).reshape(1),
            nonfinite.to(torch.float64).reshape(1),
            torch.tensor([n_seq_local], dtype=torch.float64, device=scores_TN.device),
        ]
    )
    if count_row is not None:
        row, rows = count_row
        block_RN = torch.zeros(rows, N, dtype=torch.float64, device=scores_TN.device)
        block_RN[row] = kept_counts_N.to(torch.float64)
        plain_local = torch.cat([plain_local, block_RN.flatten()])
    n_host = plain_local.numel() - (N + 2)  # the flag, n_seq and the dispatch block: what the host reads
    aux_counts_local_N = counts_local_N
    if separate:
        # the Switch loss's unbiased counts ride the same all-reduce, last (the host never reads them)
        aux_counts_local_N = count_experts(unbiased_idx_TK, N)
        plain_local = torch.cat([plain_local, aux_counts_local_N.to(torch.float64)])
    n_diff = diff_local.numel()
    local_vec = torch.cat([diff_local, plain_local])
    # one collective per layer carries the stats, the gradient-carrying sums and the non-finite flag
    where = f"MoE layer {layer}: router statistics all-reduce"
    global_vec = all_reduce_sum_scaled_grad(local_vec, group, where) if group is not None else local_vec

    plain_global = global_vec[n_diff:].detach()
    host: list[float] = []
    if cfg.check_finite or count_row is not None:
        # why one read-back: the non-finite flag and the dispatch counts share the layer's one host sync
        host = plain_global[N + 2 : N + 2 + n_host].tolist()
    bad_ranks = int(host[0]) if cfg.check_finite else 0
    if bad_ranks:
        here = "yes" if bool(nonfinite) else "no"
        raise NonFiniteError(
            f"MoE layer {layer}: router logits hold NaN/Inf on {bad_ranks} rank(s) of the balance group "
            f"(this rank: {here}); raised on every rank together, before dispatch"
        )
    counts_N = plain_global[:N]
    T_global = plain_global[N]
    dropped_global = plain_global[N + 1]
    n_seq_global = plain_global[N + 3]
    aux_counts_N = plain_global[-N:] if separate else counts_N

    OptT = Tensor | None

    def unpack(vec: Tensor, T: Tensor, n_seq: Tensor) -> tuple[Tensor, OptT, OptT, OptT]:
        Tc = T.clamp(min=1).to(dtype)
        P_N = vec[:N].to(dtype) / Tc
        z = vec[N].to(dtype) / Tc if want_z else None
        off = N + (1 if want_z else 0)
        load = vec[off : off + N].to(dtype) * (N / (K * Tc)) if route.load_prob_TN is not None else None
        off += N if route.load_prob_TN is not None else 0
        seq = vec[off].to(dtype) / n_seq.clamp(min=1).to(dtype) if want_seq else None
        return P_N, z, load, seq

    P_glob, z_glob, load_glob, seq_glob = unpack(global_vec[:n_diff], T_global, n_seq_global)
    f_glob = counts_N.to(dtype) * (N / (K * T_global.clamp(min=1).to(dtype)))

    if cfg.balance_scope == "local":
        P_N, z, smooth_f, seq = unpack(
            diff_local,
            torch.tensor(float(T_local), dtype=torch.float64),
            torch.tensor(float(n_seq_local), dtype=torch.float64),
        )
        f_N = aux_counts_local_N.to(dtype) * (N / (K * max(T_local, 1)))
        f_routed_N = counts_local_N.to(dtype) * (N / (K * max(T_local, 1)))
    else:
        # the sequence-wise loss has no running window: each sequence is complete in its micro-batch
        P_N, z, smooth_f, seq = P_glob, z_glob, load_glob, seq_glob
        f_routed_N = f_glob
        f_N = aux_counts_N.to(dtype) * (N / (K * T_global.clamp(min=1).to(dtype))) if separate else f_glob
        if cfg.balance_scope == "global_batch" and window_counts_N is not None:
            run_T = (window_tokens + T_global).clamp(min=1)
            f_routed_N = ((window_counts_N + counts_N) * (N / (K * run_T))).to(dtype)
            f_N = f_routed_N
            if separate:
                run_aux = (window_aux_counts_N if window_aux_counts_N is not None else 0) + aux_counts_N
                f_N = (run_aux * (N / (K * run_T))).to(dtype)

    terms: dict[str, Tensor] = {}
    zero = scores_TN.new_zeros(())
    if alpha is None:
        alpha = cfg.initial_alpha
    elif isinstance(alpha, Tensor):  # set by a controller; no host sync, and the loss keeps its dtype
        alpha = alpha.to(dtype)
    terms["switch"] = alpha * (f_N.detach() * P_N).sum() if isinstance(alpha, Tensor) or alpha > 0 else zero
    if cfg.cv_importance_coef > 0:
        terms["cv_importance"] = cfg.cv_importance_coef * cv_squared(P_N)
    if cfg.cv_load_coef > 0:
        # with hard top-K, f carries no gradient: this term is then reported but trains nothing; it takes
        # the routed f whatever aux_loss_counts says, because it measures the load the experts get
        hard_f = f_routed_N.detach()
        terms["cv_load"] = cfg.cv_load_coef * cv_squared(smooth_f if smooth_f is not None else hard_f)
    if want_z:
        terms["z"] = cfg.z_loss_coef * z
    if want_seq:
        terms["seq"] = cfg.seq_aux_loss_coef * seq
    aux = sum(terms.values(), zero)

    stats = MoEStats(
        tokens_per_expert=counts_N.round().to(torch.int64),
        f=f_glob.detach(),
        P=P_glob.detach(),
        dropped=dropped_global.round().to(torch.int64),
        num_tokens=T_global.round().to(torch.int64),
        tokens_per_expert_local=counts_local_N,
    )
    kept_counts_RN = None
    if count_row is not None:
        flat = [int(round(v)) for v in host[2:]]
        kept_counts_RN = [flat[r * N : (r + 1) * N] for r in range(count_row[1])]
    return BalanceResult(
        aux_loss=aux,
        terms=terms,
        stats=stats,
        counts_N=counts_N,
        aux_counts_N=aux_counts_N,
        kept_counts_RN=kept_counts_RN,
    )
