"""Router: scores s = G(u . e_i), top-K selection (optionally biased, optionally group-limited), and gates.

Shape legend: T tokens, D model dim, N experts, K top-k, G expert groups, J groups kept per token, E experts
per group (N / G).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_dist.moe.config import MoEConfig


@dataclass
class RouterOutput:
    logits_TN: Tensor
    """u . e_i (after noise in noisy training), in the router's compute dtype (>= fp32)."""
    scores_TN: Tensor
    """s = G(logits): the seed's scores, used for P_i and the gates."""
    topk_idx_TK: Tensor
    """Chosen experts per token: top-K of s + b (the bias only steers selection)."""
    topk_scores_TK: Tensor
    """s at the chosen experts (unnormalised): the capacity-drop priority."""
    gates_TK: Tensor
    """g at the chosen experts: s, or s renormalised over the K when normalize_topk; then times
    routed_scaling_factor."""
    load_prob_TN: Tensor | None
    """Noisy gating only: Pr[i in TopK(t)] under fresh noise (Shazeer et al. 2017's smooth load)."""


def score_fn(logits_TN: Tensor, name: str) -> Tensor:
    """The seed's G: positive scores from logits."""
    if name == "softmax":
        return torch.softmax(logits_TN, dim=-1)
    if name == "sigmoid":
        return torch.sigmoid(logits_TN)
    return torch.exp(logits_TN)


class Router(nn.Module):
    """Holds the expert centroids e_i (``weight``, [N, D]) and the selection bias b (``expert_bias``)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_model))
        # why fp32 buffer: the bias accumulates many +-gamma steps; low precision would stall it
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        if cfg.noisy_gating:
            self.noise_weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.d_model))
        else:
            self.noise_weight = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.cfg.router_init_std)
        if self.noise_weight is not None:
            nn.init.zeros_(self.noise_weight)

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        """fp32 at least (router precision matters for top-K stability); fp64 stays fp64."""
        return torch.promote_types(x.dtype, torch.float32)

    def forward(self, x_TD: Tensor) -> RouterOutput:
        # why autocast off: under bf16 autocast the matmul would silently drop to bf16 and flip top-K picks
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return self._route(x_TD)

    def _route(self, x_TD: Tensor) -> RouterOutput:
        cfg = self.cfg
        dtype = self.compute_dtype(x_TD)
        x_TD = x_TD.to(dtype)
        logits_TN = x_TD @ self.weight.to(dtype).t()
        load_prob_TN = None
        if self.noise_weight is not None and self.training:
            clean_TN = logits_TN
            sigma_TN = F.softplus(x_TD @ self.noise_weight.to(dtype).t()) + 1e-2
            logits_TN = clean_TN + torch.randn_like(clean_TN) * sigma_TN
            load_prob_TN = smooth_load(clean_TN, logits_TN, sigma_TN, cfg.top_k)
        scores_TN = score_fn(logits_TN, cfg.score_func)
        select_TN = scores_TN.detach()
        if cfg.bias_update_rate > 0:
            select_TN = select_TN + self.expert_bias.to(dtype)
        if cfg.n_group is not None and cfg.topk_group is not None and cfg.topk_group < cfg.n_group:
            select_TN = limit_to_groups(select_TN, cfg.n_group, cfg.topk_group)
        topk_idx_TK = torch.topk(select_TN, cfg.top_k, dim=-1).indices
        topk_scores_TK = scores_TN.gather(1, topk_idx_TK)
        gates_TK = topk_scores_TK
        if cfg.normalize_topk:
            gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
        if cfg.routed_scaling_factor != 1.0:
            gates_TK = gates_TK * cfg.routed_scaling_factor
        return RouterOutput(logits_TN, scores_TN, topk_idx_TK, topk_scores_TK, gates_TK, load_prob_TN)


def limit_to_groups(select_TN: Tensor, n_group: int, topk_group: int) -> Tensor:
    """DeepSeek-V3's group-limited selection: keep the ``topk_group`` best of ``n_group`` contiguous expert
    groups per token, scoring a group by the sum of its two best selection scores (s + b), and set every
    expert outside them to -inf, so that the top-K that follows picks inside the kept groups only.

    why -inf (Megatron's group_limited_topk) rather than HF DeepSeek-V3's 0: with a negative bias a biased
    score can be below 0, and a masked 0 would then win; -inf makes "at most topk_group groups" (and so at
    most topk_group EP ranks when n_group = EP size) a guarantee.
    """
    T, N = select_TN.shape
    select_TGE = select_TN.view(T, n_group, N // n_group)
    best = min(2, N // n_group)  # why min: a group of one expert has no second-best score
    group_score_TG = select_TGE.topk(best, dim=-1).values.sum(-1)
    group_idx_TJ = group_score_TG.topk(topk_group, dim=-1).indices
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, group_idx_TJ, True)
    keep_TN = keep_TG.unsqueeze(-1).expand_as(select_TGE).reshape(T, N)
    return select_TN.masked_fill(~keep_TN, float("-inf"))


def smooth_load(clean_TN: Tensor, noisy_TN: Tensor, sigma_TN: Tensor, k: int) -> Tensor:
    """Shazeer et al. 2017, eq. 8-10: Pr[clean_i + noise > k-th largest noisy logit of the others].

    The threshold for expert i is the k-th largest noisy logit excluding i: the (k+1)-th largest overall
    when i is itself in the top k, else the k-th largest.
    """
    n = noisy_TN.shape[-1]
    if k >= n:
        return torch.ones_like(clean_TN)
    top_TK1 = torch.topk(noisy_TN, k + 1, dim=-1).values
    kth_T1, kplus1_T1 = top_TK1[:, k - 1 : k], top_TK1[:, k : k + 1]
    in_topk_TN = noisy_TN >= kth_T1
    threshold_TN = torch.where(in_topk_TN, kplus1_T1, kth_T1)
    normal = torch.distributions.Normal(
        torch.zeros((), dtype=clean_TN.dtype, device=clean_TN.device),
        torch.ones((), dtype=clean_TN.dtype, device=clean_TN.device),
    )
    return normal.cdf((clean_TN - threshold_TN) / sigma_TN)
