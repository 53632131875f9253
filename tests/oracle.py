"""A single-process oracle written plainly from the seed formulas (none of moe_dist's code is called).

s_{i,t} = G(u_t . e_i);  g_{i,t} = s_{i,t} if i in TopK_t (of s + b) else 0
h_t = u_t + sum_i g_{i,t} FFN_i(u_t)
f_i = N/(K T) * #{t : i in TopK_t};  P_i = 1/T sum_t s_{i,t}
L_balance = alpha sum_i f_i P_i;  CV^2(z) = (mean z^2 - mean(z)^2)/mean(z)^2
z-loss = mean_t logsumexp(logits_t)^2
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ACT = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}


@dataclass
class Case:
    name: str
    cfg: dict
    tokens: list[int]  # tokens per rank (may differ)
    seed: int = 0
    bias_scale: float = 0.0  # nonzero: a fixed selection bias b (bias_update_rate must be > 0 to use it)
    extra: dict = field(default_factory=dict)


def make_tensors(case: Case) -> dict:
    """Full (all-expert, all-rank) fp64 weights and inputs, from the case's seed."""
    c = case.cfg
    N, D, Fd = c["num_experts"], c["d_model"], c["d_ff"]
    g = torch.Generator().manual_seed(case.seed)
    t = {
        "router": torch.randn(N, D, generator=g, dtype=torch.float64) * 0.5,
        "w1": torch.randn(N, D, Fd, generator=g, dtype=torch.float64) / math.sqrt(D),
        "w2": torch.randn(N, Fd, D, generator=g, dtype=torch.float64) / math.sqrt(Fd),
        "bias": torch.randn(N, generator=g, dtype=torch.float64) * case.bias_scale,
        "xs": [torch.randn(n, D, generator=g, dtype=torch.float64) for n in case.tokens],
        "cot": [torch.randn(n, D, generator=g, dtype=torch.float64) for n in case.tokens],
    }
    return t


def G(logits, name):
    if name == "softmax":
        return torch.softmax(logits, dim=-1)
    if name == "sigmoid":
        return torch.sigmoid(logits)
    return torch.exp(logits)


def cv2(z):
    mu = z.mean()
    return ((z**2).mean() - mu**2) / mu**2


def _block(c: dict, u, router, w1, w2, bias):
    """One rank's tokens: gate matrix (capacity applied per rank, as the layer does), outputs, stats."""
    N, K = c["num_experts"], c["top_k"]
    logits = u @ router.t()
    s = G(logits, c.get("score_func", "softmax"))
    sel = s.detach() + (bias if c.get("bias_update_rate", 0) > 0 else 0)
    chosen = torch.zeros(u.shape[0], N, dtype=torch.bool)
    for t in range(u.shape[0]):
        order = sorted(range(N), key=lambda i: -float(sel[t, i]))
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
    g = torch.where(kept, g, torch.zeros_like(g))
    act = ACT[c.get("activation", "gelu")]
    h = u.clone() if c.get("residual", True) else torch.zeros_like(u)
    for i in range(N):
        h = h + g[:, i : i + 1] * (act(u @ w1[i]) @ w2[i])
    lse2 = torch.logsumexp(logits, dim=1) ** 2
    return h, s, chosen, kept, lse2


def _aux(c: dict, s, chosen, lse2):
    N, K = c["num_experts"], c["top_k"]
    T = s.shape[0]
    f = N / (K * T) * chosen.sum(0).to(s.dtype)
    P = s.sum(0) / T
    terms = {"switch": c.get("aux_loss_coef", 0.0) * (f * P).sum()}
    if c.get("cv_importance_coef", 0) > 0:
        terms["cv_importance"] = c["cv_importance_coef"] * cv2(P)
    if c.get("cv_load_coef", 0) > 0:
        terms["cv_load"] = c["cv_load_coef"] * cv2(f)
    if c.get("z_loss_coef", 0) > 0:
        terms["z"] = c["z_loss_coef"] * lse2.mean()
    return f, P, terms


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
    blocks = [_block(c, x, router, w1, w2, t["bias"]) for x in xs]
    hs = [b[0] for b in blocks]
    s_all = torch.cat([b[1] for b in blocks])
    chosen_all = torch.cat([b[2] for b in blocks])
    lse_all = torch.cat([b[4] for b in blocks])
    f, P, terms = _aux(c, s_all, chosen_all, lse_all)
    aux = sum(terms.values())
    task = sum((h * cot).sum() for h, cot in zip(hs, t["cot"], strict=True))
    if c.get("balance_scope", "global") == "local":
        local_aux = [sum(_aux(c, b[1], b[2], b[4])[2].values()) for b in blocks]
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
    }
