"""Seed identities, relations to other systems' losses, bad input, bias balancing, grouped GEMM path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from moe_dist import ConfigError, MoEConfig, MoELayer, NonFiniteError, cv_squared
from moe_dist.moe.router import smooth_load
from tests.helpers.asserts import assert_fp32_paths_match
from tests.helpers.launch import run_ranks
from tests.helpers.oracle import Case, make_tensors, oracle
from tests.helpers.workers import bias_worker, fp32_run, nan_worker, skip_collective_worker

SMALL = dict(num_experts=8, d_model=16, d_ff=32)


def switch_term(logits: torch.Tensor, k: int) -> float:
    """Our layer's Switch term (alpha=1, softmax) for the given logits, through the real layer."""
    T, N = logits.shape
    layer = MoELayer(MoEConfig(**dict(SMALL, top_k=k, aux_loss_coef=1.0))).double()
    # x = [logits, 0] and router = [I, 0] reproduce the logits exactly: x @ W^T = logits
    x = torch.zeros(T, 16, dtype=torch.float64)
    x[:, :N] = logits
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(N, 16, dtype=torch.float64))
    return float(layer(x).terms["switch"].detach())


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(96, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2


def test_relation_to_deepspeed_losses(logits: torch.Tensor) -> None:
    """DeepSpeed's own gating functions: top-1 l_aux = ours at K=1; top-2 l_aux uses only the top-1
    mask, so it equals ours at K=1 too (not at K=2); top-k (k>2) l_aux = ours at the same K."""
    sm = pytest.importorskip("deepspeed.moe.sharded_moe")
    lf = logits.float()  # DeepSpeed's gating mixes in float32 masks
    l1 = sm.top1gating(lf, 1.0, 1, drop_tokens=True, use_rts=False)[0]
    l2 = sm.top2gating(lf, 1.0, 1, drop_tokens=True, top2_2nd_expert_sampling=False)[0]
    l3 = sm.topkgating(lf, 3, 1.0, 1, drop_tokens=True)[0]
    ours1, ours2, ours3 = switch_term(logits, 1), switch_term(logits, 2), switch_term(logits, 3)
    assert float(l1) == pytest.approx(ours1, rel=1e-5)
    assert float(l2) == pytest.approx(ours1, rel=1e-5)
    assert float(l2) != pytest.approx(ours2, rel=1e-3)  # the top-2 mismatch is real on this data
    assert float(l3) == pytest.approx(ours3, rel=1e-5)


def test_relation_to_megatron_and_mixtral(logits: torch.Tensor) -> None:
    """Megatron c*E/(k*T^2)*sum_i (sum_t s_ti)*n_i equals ours with alpha=c; HF Mixtral's
    E*sum_k sum_i frac_ki*P_i is K times ours. Both written plainly from their definitions."""
    T, E = logits.shape
    for k in (1, 2, 4):
        s = torch.softmax(logits, dim=-1)
        top = torch.topk(s, k).indices
        n = torch.zeros(E, dtype=torch.float64).index_add_(0, top.flatten(), torch.ones(T * k).double())
        megatron = E / (k * T * T) * (s.sum(0) * n).sum()
        frac_KE = F.one_hot(top, E).double().mean(0)  # [k, E]: fraction of tokens whose j-th pick is i
        mixtral = E * (frac_KE * s.mean(0)).sum()
        ours = switch_term(logits, k)
        assert float(megatron) == pytest.approx(ours, rel=1e-12)
        assert float(mixtral) == pytest.approx(k * ours, rel=1e-12)


def test_seed_identities() -> None:
    g = torch.Generator().manual_seed(0)
    z = (torch.rand(8, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    cv_squared(z).backward()
    mu, nu, N = z.detach().mean(), (z.detach() ** 2).mean(), 8
    closed = 2 / N * (z.detach() / mu**2 - nu / mu**3)  # the seed's dCV^2/dz_k
    torch.testing.assert_close(z.grad, closed, rtol=1e-12, atol=0)
    assert float(cv_squared(torch.full((5,), 3.0))) == 0.0
    # uniform routing with softmax: P_i = 1/N, so L_balance = alpha * sum f_i / N = alpha
    layer = MoELayer(MoEConfig(**SMALL, top_k=2, aux_loss_coef=0.37)).double()
    with torch.no_grad():
        layer.router.weight.zero_()
    out = layer(torch.randn(50, 16, dtype=torch.float64))
    assert float(out.aux_loss.detach()) == pytest.approx(0.37, rel=1e-12)
    assert float(out.stats.f.sum()) == pytest.approx(8, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(top_k=9), "top_k=9 exceeds num_experts=8"),
        (dict(score_func="tanh"), "score_func"),
        (dict(aux_loss_coef=-1e-2), "aux_loss_coef"),
        (dict(z_loss_coef=float("nan")), "z_loss_coef"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(balance_scope="world"), "balance_scope"),
        (dict(d_model="256"), "d_model must be int"),
        (dict(noisy_gating=True, bias_update_rate=1e-3), "cannot be combined"),
    ],
)
def test_bad_config(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        MoEConfig(**dict(SMALL, **kwargs))


def _indivisible(rank: int, world: int) -> None:
    import torch.distributed as dist

    MoELayer(MoEConfig(num_experts=3, d_model=16, d_ff=32, top_k=1), ep_group=dist.group.WORLD)


def test_experts_not_divisible_by_ep_raises_before_collectives() -> None:
    res = run_ranks(_indivisible, 2, expect_errors=True, timeout=120)
    for status, msg in res:
        assert status == "error" and "ConfigError" in msg and "not divisible by the EP group size 2" in msg


def test_nan_logits_raise_on_every_rank_naming_the_layer() -> None:
    case = Case("nan", dict(SMALL, top_k=2), [16, 16], seed=5)
    res = run_ranks(nan_worker, 2, case, expect_errors=True, timeout=120)
    for status, msg in res:
        assert status == "error" and "NonFiniteError" in msg and "MoE layer 7" in msg and "1 rank(s)" in msg


def test_nan_logits_local() -> None:
    layer = MoELayer(MoEConfig(**SMALL), layer_idx=3)
    x = torch.randn(4, 16)
    x[2, 5] = float("inf")
    with pytest.raises(NonFiniteError, match="MoE layer 3"):
        layer(x)


@pytest.mark.parametrize("world", [1, 2])
def test_bias_balancing_reaches_balance(world: int) -> None:
    """A skewed router (inputs shifted by +2); only the loss-free bias acts. Global MaxVio must fall from
    a heavy skew (> 1.0) to a mean under 0.3 over the last 20 of 150 steps (measured: 0.20 and 0.16),
    and the bias must be identical on every rank."""
    case = Case(
        "bias", dict(SMALL, top_k=2, score_func="sigmoid", bias_update_rate=1e-2), [1] * world, seed=8
    )
    res = run_ranks(bias_worker, world, case, 150)
    mv = res[0]["maxvio"]
    assert mv[0] > 1.0, f"the router must start skewed, got MaxVio {mv[0]:.2f}"
    assert sum(mv[-20:]) / 20 < 0.3, f"no balance: last MaxVio {mv[-20:]}"
    for r in res[1:]:
        assert torch.equal(r["bias"], res[0]["bias"])


def test_recompute_does_not_double_counts() -> None:
    layer = MoELayer(MoEConfig(**SMALL, top_k=2))
    x = torch.randn(40, 16, requires_grad=True)
    out = checkpoint(lambda t: layer(t).hidden, x, use_reentrant=False)
    out.sum().backward()
    assert float(layer.window_tokens) == 40
    assert float(layer.window_counts.sum()) == 80


def test_grouped_mm_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 takes F.grouped_mm (asserted). It must match the per-expert matmul path to 1e-6 and the
    fp64 oracle to fp32 accuracy (norm-relative 1e-4; both fp32 paths measured 3.9e-5 on the router)."""
    case = Case("gmm", dict(SMALL, top_k=2), [64], seed=9)
    t = make_tensors(case)
    gmm, gmm_taken = fp32_run(case, t)
    monkeypatch.setattr("moe_dist.moe.experts.grouped_mm_ok", lambda x, w: False)
    loop, loop_taken = fp32_run(case, t)
    ref = oracle(case, t)
    assert gmm_taken and not loop_taken
    assert set(gmm) == {"hidden", "grad_x", "grad_w1", "grad_w2", "grad_router"}
    assert_fp32_paths_match(gmm, loop, ref)


def test_smooth_load_is_unbiased_and_trains() -> None:
    """Shazeer's estimator: averaged over noise draws it equals the empirical top-K frequency; and the
    CV^2(load) term sends gradient into the router and the noise weights."""
    g = torch.Generator().manual_seed(4)
    clean = torch.randn(6, 8, generator=g, dtype=torch.float64)
    sigma = torch.rand(6, 8, generator=g, dtype=torch.float64) + 0.5
    draws = 20000
    noisy = clean + torch.randn(draws, 6, 8, generator=g, dtype=torch.float64) * sigma
    k = 2
    est = smooth_load(clean.repeat(draws, 1), noisy.reshape(-1, 8), sigma.repeat(draws, 1), k)
    est = est.view(draws, 6, 8).mean(0)
    kth = torch.topk(noisy, k, dim=-1).values[..., -1:]
    freq = (noisy >= kth).double().mean(0)
    assert (est - freq).abs().max() < 0.02
    layer = MoELayer(MoEConfig(**SMALL, top_k=2, aux_loss_coef=0.0, cv_load_coef=1.0, noisy_gating=True))
    with torch.no_grad():
        layer.router.noise_weight.normal_(std=0.1)
    layer(torch.randn(64, 16)).aux_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.router.noise_weight.grad.abs().sum() > 0


def test_capacity_formula() -> None:
    """C = ceil(cf * K * T / N): with every token sent to expert 0, exactly C are kept."""
    T, N, K, cf = 50, 8, 1, 1.3
    layer = MoELayer(MoEConfig(**dict(SMALL, top_k=K, capacity_factor=cf)))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0
    x = torch.zeros(T, 16)
    x[:, 0] = torch.rand(T) + 1
    out = layer(x)
    assert int(out.stats.dropped) == T - math.ceil(cf * K * T / N)


@pytest.mark.parametrize(
    # the dispatch counts ride the statistics all-reduce, so the first dispatch collective is the rows'
    "skip,stage",
    [("dispatch", "dispatch all-to-all"), ("combine", "combine all-to-all")],
)
def test_skipped_collective_names_layer_and_stage(skip: str, stage: str) -> None:
    case = Case("skip", dict(SMALL, top_k=2), [16, 16], seed=6)
    res = run_ranks(skip_collective_worker, 2, case, skip, expect_errors=True, timeout=120, pg_timeout_s=3)
    status, msg = res[0]
    assert status == "error" and "CollectiveError" in msg and f"MoE layer 3: {stage} failed" in msg, msg[:500]
    assert res[1][0] == "ok"


def test_low_precision_expert_weights_are_cast_once_per_update() -> None:
    """bf16 rows against fp32 expert weights: the bf16 copy is made once per weight update (the optimizer's
    in-place step bumps the version), and every gradient equals that of a fresh cast on every call."""
    from moe_dist.moe.experts import GroupedExperts

    torch.manual_seed(0)
    cached = GroupedExperts(4, 16, 32, "swiglu")
    cached.init_experts(0, seed=0, layer_idx=0)
    fresh = GroupedExperts(4, 16, 32, "swiglu")
    fresh.load_state_dict(cached.state_dict())
    fresh.cast = lambda w, dtype: w.to(dtype)  # the per-call cast the cache replaces
    counts = torch.tensor([10, 5, 20, 5])
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (cached, fresh)]
    for step in range(3):
        grads = []
        for m, opt in zip((cached, fresh), opts, strict=True):
            opt.zero_grad()
            for _ in range(2):  # two micro-batches per step: the second reuses the copy
                x = torch.randn(40, 16, generator=torch.Generator().manual_seed(step)).bfloat16()
                x.requires_grad_()
                m(x, counts).float().pow(2).sum().backward()
            grads.append((x.grad, m.w1.grad.clone(), m.w2.grad.clone()))
            opt.step()
        assert cached.cast.casts == 2 * (step + 1)  # w1 and w2, once per optimizer step
        for a, b in zip(*grads, strict=True):
            assert torch.equal(a, b)
    assert torch.equal(cached.w1, fresh.w1) and cached.w1.dtype == torch.float32
