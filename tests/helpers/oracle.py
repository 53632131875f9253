"""A single-process oracle written plainly from the seed formulas (none of moe_dist's code is called).

s_{i,t} = G(u_t . e_i);  g_{i,t} = rsf * s_{i,t} if i in TopK_t (of s + b) else 0  (rsf: routed scaling)
h_t = u_t + sum_i g_{i,t} FFN_i(u_t) + sigmoid(u_t . w_g) * FFN_shared(u_t)   (gate only if enabled)
FFN(u) = act(u W1) W2, or gated (swiglu/geglu): (act(u W1[:, :F]) * u W1[:, F:]) W2
group-limited: groups of N/n_group contiguous experts; group score = sum of its 2 best s + b; TopK_t is
  taken among the experts of the topk_group best groups only
f_i = N/(K T) * #{t : i in TopK_t};  P_i = 1/T sum_t s_{i,t}
L_balance = alpha sum_i f~_i P_i, f~ = f, or with aux_loss_counts "unbiased" f over Topk(s_t) (the top-K of
  the unbiased scores over all experts: no bias, no group limit)
CV^2(z) = (mean z^2 - mean(z)^2)/mean(z)^2
z-loss = mean_t logsumexp(logits_t)^2
seq loss (DeepSeek-V3 eq. 17-20) = alpha_seq * mean over sequences of sum_i f_i P_i, with f and P taken
  over the sequence's S tokens, f over Topk(s_t) (eq. 18) and P over s'_{i,t} = s_{i,t} / sum_j s_{j,t}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ACT = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}
GATED = {"swiglu": F.silu, "geglu": F.gelu}


@dataclass
class Case:
    name: str
    cfg: dict
    tokens: list[int]  # tokens per rank (may differ)
    seed: int = 0
    bias_scale: float = 0.0  # nonzero: a fixed selection bias b (bias_update_rate must be > 0 to use it)
    extra: dict = field(default_factory=dict)
    seq_len: int | None = None  # tokens per sequence (rank blocks split into [T/S, S, D]); None: one block


def gated(c: dict) -> bool:
    return c.get("activation", "gelu") in GATED


def shared_width(c: dict) -> int:
    return c.get("num_shared_experts", 0) * (c.get("shared_d_ff") or c["d_ff"])


def make_tensors(case: Case) -> dict:
    """Full (all-expert, all-rank) fp64 weights and inputs, from the case's seed."""
    c = case.cfg
    N, D, Fd = c["num_experts"], c["d_model"], c["d_ff"]
    g = torch.Generator().manual_seed(case.seed)
    t = {
        "router": torch.randn(N, D, generator=g, dtype=torch.float64) * 0.5,
        "w1": torch.randn(N, D, 2 * Fd if gated(c) else Fd, generator=g, dtype=torch.float64) / math.sqrt(D),
        "w2": torch.randn(N, Fd, D, generator=g, dtype=torch.float64) / math.sqrt(Fd),
        "bias": torch.randn(N, generator=g, dtype=torch.float64) * case.bias_scale,
        "xs": [torch.randn(n, D, generator=g, dtype=torch.float64) for n in case.tokens],
        "cot": [torch.randn(n, D, generator=g, dtype=torch.float64) for n in case.tokens],
    }
    H = shared_width(c)
    if H:  # drawn last, so the cases without shared experts keep their tensors
        t["ws1"] = torch.randn(D, 2 * H if gated(c) else H, generator=g, dtype=torch.float64) / math.sqrt(D)
        t["ws2"] = torch.randn(H, D, generator=g, dtype=torch.float64) / math.sqrt(H)
        t["wg"] = torch.randn(D, generator=g, dtype=torch.float64)
    return t


def G(logits, name):
    if name == "softmax":
        return torch.softmax(logits, dim=-1)
    if name == "sigmoid":
        return torch.sigmoid(logits)
    return torch.exp(logits)


def cv2(z):
    mu = z.mean()
    if float(mu.detach()) == 0.0:  # no tokens anywhere: every entry is 0, so they are all equal
        return torch.zeros((), dtype=z.dtype)
    return ((z**2).mean() - mu**2) / mu**2


def ffn(c: dict, u, w1, w2):
    """act(u W1) W2, or (act(u W1_gate) * u W1_up) W2 with W1 = [W1_gate | W1_up] for a gated activation."""
    a = c.get("activation", "gelu")
    if a in GATED:
        Fd = w2.shape[0]
        return (GATED[a](u @ w1[:, :Fd]) * (u @ w1[:, Fd:])) @ w2
    return ACT[a](u @ w1) @ w2


def candidates(c: dict, sel_t) -> list[int]:
    """Experts token t may pick: all, or those of its topk_group best groups (group-limited routing)."""
    N = c["num_experts"]
    n_group = c.get("n_group")
    if n_group is None:
        return list(range(N))
    size = N // n_group
    group_score = []
    for grp in range(n_group):
        vals = sorted((float(sel_t[i]) for i in range(grp * size, (grp + 1) * size)), reverse=True)
        group_score.append(sum(vals[:2]))
    best_groups = sorted(range(n_group), key=lambda grp: -group_score[grp])[: c["topk_group"]]
    return [i for i in range(N) if i // size in best_groups]


def _block(c: dict, u, router, w1, w2, bias, shared=None):
    """One rank's tokens: gate matrix (capacity applied per rank, as the layer does), outputs, stats."""
    N, K = c["num_experts"], c["top_k"]
    logits = u @ router.t()
    s = G(logits, c.get("score_func", "softmax"))
    sel = s.detach() + (bias if c.get("bias_update_rate", 0) > 0 else 0)
    chosen = torch.zeros(u.shape[0], N, dtype=torch.bool)
    for t in range(u.shape[0]):
        order = sorted(candidates(c, sel[t]), key=lambda i: -float(sel[t, i]))
        for i in order[:K]:
            chosen[t, i] = True
    kept = chosen.clone()
    cf = c.get("capacity_factor")
    if cf is not None:
        cap = math.ceil(cf * K * u.shape[0] / N)
        for i in range(N):
            toks = [t for t in range(u.shape[0]) if chosen[t, i]]
            toks.sort(key=lambda t: -float(s[t, i].detach()))
            for t in toks[cap:]:
                kept[t, i] = False
    g = torch.where(chosen, s, torch.zeros_like(s))
    if c.get("normalize_topk"):
        g = g / g.sum(dim=1, keepdim=True)
    g = g * c.get("routed_scaling_factor", 1.0)
    g = torch.where(kept, g, torch.zeros_like(g))
    h = u.clone() if c.get("residual", True) else torch.zeros_like(u)
    for i in range(N):
        h = h + g[:, i : i + 1] * ffn(c, u, w1[i], w2[i])
    if shared is not None:
        ws1, ws2, wg = shared
        scale = torch.sigmoid(u @ wg).unsqueeze(1) if c.get("shared_expert_gate") else 1.0
        h = h + scale * ffn(c, u, ws1, ws2)
    lse2 = torch.logsumexp(logits, dim=1) ** 2
    unbiased = torch.zeros(u.shape[0], N, dtype=torch.bool)  # Topk(s_t): no bias, all experts
    for t in range(u.shape[0]):
        for i in sorted(range(N), key=lambda i: -float(s[t, i].detach()))[:K]:
            unbiased[t, i] = True
    return h, s, chosen, kept, lse2, unbiased


def seq_balance(c: dict, s_seq, chosen_seq):
    """sum_i f_i P_i over one sequence: f_i = N/(K S) #{t : i in chosen_t}, P_i = mean_t s_it / sum_j s_jt
    (``chosen`` = Topk(s_t), DeepSeek-V3 eq. 18)."""
    N, K = c["num_experts"], c["top_k"]
    S = s_seq.shape[0]
    f = N / (K * S) * chosen_seq.sum(0).to(s_seq.dtype)
    P = (s_seq / s_seq.sum(dim=1, keepdim=True)).sum(0) / S
    return (f * P).sum()


def _aux(c: dict, s, chosen, lse2, seqs, unbiased):
    """``seqs``: (s, Topk(s)) of every sequence pooled in this loss; ``unbiased``: Topk(s) of every token."""
    N, K = c["num_experts"], c["top_k"]
    T = s.shape[0]
    Tc = max(T, 1)  # no tokens at all (one empty rank at world 1): every sum is empty, every term 0
    f = N / (K * Tc) * chosen.sum(0).to(s.dtype)
    P = s.sum(0) / Tc
    f_switch = N / (K * Tc) * unbiased.sum(0).to(s.dtype) if c.get("aux_loss_counts") == "unbiased" else f
    terms = {"switch": c.get("aux_loss_coef", 0.0) * (f_switch * P).sum()}
    if c.get("cv_importance_coef", 0) > 0:
        terms["cv_importance"] = c["cv_importance_coef"] * cv2(P)
    if c.get("cv_load_coef", 0) > 0:
        terms["cv_load"] = c["cv_load_coef"] * cv2(f)
    if c.get("z_loss_coef", 0) > 0:
        terms["z"] = c["z_loss_coef"] * lse2.sum() / Tc
    if c.get("seq_aux_loss_coef", 0) > 0:
        seq_sum = sum((seq_balance(c, a, b) for a, b in seqs), torch.zeros((), dtype=s.dtype))
        terms["seq"] = c["seq_aux_loss_coef"] * seq_sum / max(len(seqs), 1)
    return f, P, terms


def sequences(case: Case, s, chosen) -> list:
    """One rank's rows split into its sequences (consecutive blocks of seq_len; None: one sequence)."""
    S = case.seq_len or max(s.shape[0], 1)  # a rank with no tokens has no sequence
    return [(s[i : i + S], chosen[i : i + S]) for i in range(0, s.shape[0], S)]


def oracle(case: Case, t: dict) -> dict:
    """Outputs per rank, global stats, and the gradients of the data-parallel objective

        S = sum_r <h_r, cot_r> + R * aux_global        (global scope)
        S = sum_r (<h_r, cot_r> + aux_r)               (local scope)

    which is what each rank's backward of (<h_r, cot_r> + out.aux_loss) should sum to: the sum over ranks
    of router grads, and each rank's input and expert grads.
    """
    c = case.cfg
    R = len(case.tokens)
    router = t["router"].clone().requires_grad_()
    w1 = t["w1"].clone().requires_grad_()
    w2 = t["w2"].clone().requires_grad_()
    xs = [x.clone().requires_grad_() for x in t["xs"]]
    shared = [t[k].clone().requires_grad_() for k in ("ws1", "ws2", "wg")] if shared_width(c) else None
    blocks = [_block(c, x, router, w1, w2, t["bias"], shared) for x in xs]
    hs = [b[0] for b in blocks]
    s_all = torch.cat([b[1] for b in blocks])
    chosen_all = torch.cat([b[2] for b in blocks])
    lse_all = torch.cat([b[4] for b in blocks])
    unbiased_all = torch.cat([b[5] for b in blocks])
    seqs = [sequences(case, b[1], b[5]) for b in blocks]
    pooled = [q for rank_seqs in seqs for q in rank_seqs]
    f, P, terms = _aux(c, s_all, chosen_all, lse_all, pooled, unbiased_all)
    aux = sum(terms.values())
    task = sum((h * cot).sum() for h, cot in zip(hs, t["cot"], strict=True))
    if c.get("balance_scope", "global") == "local":
        local_aux = [
            sum(_aux(c, b[1], b[2], b[4], q, b[5])[2].values()) for b, q in zip(blocks, seqs, strict=True)
        ]
        S = task + sum(local_aux)
    else:
        local_aux = None
        S = task + R * aux
    S.backward()
    dropped = int((chosen_all & ~torch.cat([b[3] for b in blocks])).sum())
    return {
        "hidden": [h.detach() for h in hs],
        "aux": aux.detach(),
        "local_aux": [a.detach() for a in local_aux] if local_aux else None,
        "terms": {k: v.detach() for k, v in terms.items()},
        "f": f,
        "P": P.detach(),
        "counts": chosen_all.sum(0),
        "dropped": dropped,
        "grad_x": [x.grad for x in xs],
        "grad_router": router.grad,
        "grad_w1": w1.grad,
        "grad_w2": w2.grad,
        **(
            {"grad_ws1": shared[0].grad, "grad_ws2": shared[1].grad, "grad_wg": shared[2].grad}
            if shared is not None
            else {}
        ),
    }
