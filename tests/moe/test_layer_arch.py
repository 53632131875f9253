"""The MoE architectures people train, against the plain fp64 oracle (tests/oracle.py): gated experts
(SwiGLU/GeGLU), shared experts (with and without Qwen2-MoE's gate), DeepSeek-V3's routed scaling factor,
group-limited (device-limited) routing with and without the selection bias, and the sequence-wise balance
loss. Outputs and every gradient — input, router, each expert's W1/W2, the shared W1/W2 and gate — on one
process, then on 2 and 4 gloo ranks."""

from __future__ import annotations

import copy
import dataclasses
import zlib
from pathlib import Path

import pytest
import torch

from moe_dist import ConfigError, MoEConfig, MoELayer
from moe_dist.models.config import ModelConfig
from moe_dist.models.transformer import MoETransformer, active_params
from moe_dist.moe.sync import dense_params, expert_params
from moe_dist.training.config import load_config
from moe_dist.training.preflight import config_changes
from tests.helpers.asserts import assert_fp32_paths_match, assert_layer_matches_oracle, close
from tests.helpers.launch import run_ranks
from tests.helpers.oracle import Case, make_tensors, oracle
from tests.helpers.workers import fp32_run
from tests.moe.arch_workers import arch_case_worker, pair_list_worker

BASE = dict(num_experts=8, d_model=16, d_ff=32, aux_loss_coef=1e-2, z_loss_coef=1e-3, cv_importance_coef=1e-2)
DEEPSEEK = dict(
    BASE,
    top_k=3,
    aux_loss_coef=0.0,
    score_func="sigmoid",
    normalize_topk=True,
    routed_scaling_factor=2.5,
    activation="swiglu",
    num_shared_experts=1,
    n_group=4,
    topk_group=2,
    bias_update_rate=1e-3,
    seq_aux_loss_coef=1e-2,
)


def _case(name: str, cfg: dict, tokens: list[int], **kw) -> Case:
    return Case(name, cfg, tokens, seed=zlib.crc32(name.encode()) % 1000, **kw)


def single_cases() -> list[Case]:
    T = [48]
    return [
        _case("swiglu", dict(BASE, top_k=2, activation="swiglu"), T),
        _case("geglu", dict(BASE, top_k=2, activation="geglu", score_func="sigmoid"), T),
        _case("swiglu-capacity", dict(BASE, top_k=2, activation="swiglu", capacity_factor=0.75), T),
        _case("shared", dict(BASE, top_k=2, num_shared_experts=2), T),
        _case(
            "shared-gate-swiglu",
            dict(
                BASE,
                top_k=2,
                activation="swiglu",
                num_shared_experts=1,
                shared_d_ff=24,
                shared_expert_gate=True,
            ),
            T,
        ),
        _case(
            "shared-gate-relu",
            dict(BASE, top_k=1, activation="relu", num_shared_experts=3, shared_expert_gate=True),
            T,
        ),
        _case(
            "scaling-normalised",
            dict(BASE, top_k=2, score_func="sigmoid", normalize_topk=True, routed_scaling_factor=2.5),
            T,
        ),
        _case("scaling-capacity", dict(BASE, top_k=2, routed_scaling_factor=0.7, capacity_factor=1.0), T),
        _case("groups", dict(BASE, top_k=2, score_func="sigmoid", n_group=4, topk_group=2), T),
        _case("groups-one", dict(BASE, top_k=2, n_group=4, topk_group=1), T),
        _case("groups-singletons", dict(BASE, top_k=2, score_func="exp", n_group=8, topk_group=3), T),
        _case(
            "groups-bias",
            dict(BASE, top_k=3, score_func="sigmoid", n_group=4, topk_group=2, bias_update_rate=1e-3),
            T,
            bias_scale=0.3,
        ),
        _case(
            "groups-bias-unbiased-local",
            dict(
                BASE,
                top_k=3,
                score_func="sigmoid",
                n_group=4,
                topk_group=2,
                bias_update_rate=1e-3,
                aux_loss_counts="unbiased",
                balance_scope="local",
            ),
            T,
            bias_scale=0.3,
        ),
        _case("seq-softmax", dict(BASE, top_k=2, seq_aux_loss_coef=1e-2), T, seq_len=8),
        _case(
            "seq-sigmoid", dict(BASE, top_k=2, score_func="sigmoid", seq_aux_loss_coef=1e-2), T, seq_len=12
        ),
        _case(
            "seq-exp-local",
            dict(BASE, top_k=2, score_func="exp", seq_aux_loss_coef=1e-2, balance_scope="local"),
            T,
            seq_len=8,
        ),
        _case("seq-one-sequence", dict(BASE, top_k=2, aux_loss_coef=0.3, seq_aux_loss_coef=0.3), T),
        _case("deepseek-v3", DEEPSEEK, T, seq_len=6, bias_scale=0.2),
        # no tokens at all: an empty output, zero gradients, every term 0 (no NaN from 0/0)
        _case("deepseek-v3-no-tokens", dict(DEEPSEEK, capacity_factor=1.0), [0], seq_len=6, bias_scale=0.2),
    ]


DEDUP_TWINS = (
    "device-limited-bias",
    "device-limited-one",
    "deepseek-v3",
    "deepseek-v3-empty-rank",
    "shared-gate-geglu",
)
"""Cases run again with MoEConfig.dispatch="dedup" (issue 27), as ``dedup-<name>``."""
OVERLAP_TWINS = ("shared-gate-geglu", "deepseek-v3", "dedup-deepseek-v3", "dedup-deepseek-v3-empty-rank")
"""Cases with shared experts run again with MoEConfig.overlap_shared (issue 27), as ``overlap-<name>``."""


def ep_cases(world: int) -> list[Case]:
    T = {2: [24, 40], 4: [16, 24, 8, 32]}[world]
    out = [
        _case("swiglu", dict(BASE, top_k=2, activation="swiglu"), T),
        _case("swiglu-capacity", dict(BASE, top_k=2, activation="swiglu", capacity_factor=1.0), T),
        _case(
            "shared-gate-geglu",
            dict(
                BASE,
                top_k=2,
                activation="geglu",
                num_shared_experts=2,
                shared_d_ff=16,
                shared_expert_gate=True,
            ),
            T,
        ),
        _case("shared", dict(BASE, top_k=2, num_shared_experts=1), T),
        _case("groups", dict(BASE, top_k=2, score_func="sigmoid", n_group=4, topk_group=2), T),
        # device-limited: one group per EP rank, so each token reaches at most topk_group ranks
        _case(
            "device-limited-bias",
            dict(
                BASE,
                top_k=2 if world == 2 else 3,
                score_func="sigmoid",
                n_group=world,
                topk_group=1 if world == 2 else 2,
                bias_update_rate=1e-3,
            ),
            T,
            bias_scale=0.3,
        ),
        _case("seq-sigmoid", dict(BASE, top_k=2, score_func="sigmoid", seq_aux_loss_coef=1e-2), T, seq_len=8),
        _case("deepseek-v3", DEEPSEEK, T, seq_len=8, bias_scale=0.2),
        # the Switch loss on the unbiased counts: a second [N] block in the same all-reduce
        _case(
            "deepseek-v3-switch-unbiased",
            dict(DEEPSEEK, aux_loss_coef=0.3, aux_loss_counts="unbiased", cv_load_coef=1e-2),
            T,
            seq_len=8,
            bias_scale=0.2,
        ),
        # one rank with zero tokens (no sequence, no rows to send) under every term and shared experts
        _case("deepseek-v3-empty-rank", DEEPSEEK, [0] + T[1:], seq_len=8, bias_scale=0.2),
        # device-limited with topk_group 1: all K experts of a token on one rank (dropless: a capacity drop
        # can leave a token one pair on a rank, where dedup saves nothing)
        _case("device-limited-one", dict(BASE, top_k=2, n_group=world, topk_group=1), T),
    ]
    out += [
        dataclasses.replace(c, name=f"dedup-{c.name}", cfg=dict(c.cfg, dispatch="dedup"))
        for c in out
        if c.name in DEDUP_TWINS
    ]
    return out + [
        dataclasses.replace(c, name=f"overlap-{c.name}", cfg=dict(c.cfg, overlap_shared=True))
        for c in out
        if c.name in OVERLAP_TWINS
    ]


def check_against_oracle(case: Case, per_rank: list[dict]) -> dict:
    """Every rank's output and input/expert grads; router and shared grads summed over ranks (what the
    data-parallel mean turns into the single-process gradient); the global stats and loss terms."""
    ref = oracle(case, make_tensors(case))
    assert_layer_matches_oracle(case, per_rank, ref)
    if ref["local_aux"] is None:
        for r, got in enumerate(per_rank):
            assert set(got["terms"]) == set(ref["terms"]), f"rank {r} term names"
    if "grad_ws1" in ref:
        close(sum(g["grad_ws1"] for g in per_rank), ref["grad_ws1"], "shared W1 grad summed over ranks")
        close(sum(g["grad_ws2"] for g in per_rank), ref["grad_ws2"], "shared W2 grad summed over ranks")
        if case.cfg.get("shared_expert_gate"):
            close(sum(g["grad_wg"] for g in per_rank), ref["grad_wg"], "shared gate grad summed over ranks")
            assert float(ref["grad_wg"].abs().sum()) > 0
        else:
            assert all(g["grad_wg"] is None for g in per_rank)
    return ref


SINGLE = single_cases()


@pytest.mark.parametrize("case", SINGLE, ids=[c.name for c in SINGLE])
def test_single_process_matches_oracle(case: Case) -> None:
    check_against_oracle(case, arch_case_worker(0, 1, [case]))


def _without(case: Case, *keys: str, **changes) -> Case:
    cfg = {k: v for k, v in case.cfg.items() if k not in keys}
    return dataclasses.replace(case, cfg=cfg, **changes)


def test_cases_are_not_vacuous() -> None:
    """Each option changes the oracle's answer on its case: the group limit and the bias change which
    experts are picked, the shared experts and the scaling change the output, sequences change the loss."""
    by = {c.name: c for c in SINGLE}

    def ref(case: Case) -> dict:
        return oracle(case, make_tensors(case))

    # (groups-singletons is plain top-K by construction: a group of one scores its own expert; it covers the
    # "fewer than two experts per group" edge only)
    for name in ("groups", "groups-one", "groups-bias"):
        plain = _without(by[name], "n_group", "topk_group")
        assert not torch.equal(ref(by[name])["counts"], ref(plain)["counts"]), name
    assert not torch.equal(
        ref(by["groups-bias"])["counts"], ref(_without(by["groups-bias"], bias_scale=0.0))["counts"]
    )
    for name, key in (("shared", "num_shared_experts"), ("scaling-normalised", "routed_scaling_factor")):
        base = _without(by[name], key, "shared_expert_gate")
        t = make_tensors(by[name])
        assert (ref(by[name])["hidden"][0] - oracle(base, t)["hidden"][0]).abs().max() > 1e-3, name
    assert ref(by["scaling-capacity"])["dropped"] > 0 and ref(by["swiglu-capacity"])["dropped"] > 0
    one = ref(by["seq-one-sequence"])["terms"]
    # one softmax sequence per rank: the sequence-wise loss is the Switch loss (same coefficient)
    close(one["seq"], one["switch"], "one-sequence seq term vs switch term")
    many = ref(by["seq-softmax"])["terms"]
    assert abs(float(many["seq"]) - float(many["switch"])) > 1e-4, "per-sequence f differs from pooled f"
    # under a bias and a group limit the unbiased top-K is another set than the routing choice, so the
    # sequence-wise loss (eq. 18) and the Switch loss with aux_loss_counts="unbiased" count other experts
    for name in ("deepseek-v3", "groups-bias-unbiased-local"):
        r = ref(by[name])
        assert not torch.equal(
            r["counts"], ref(_without(by[name], "n_group", "topk_group", bias_scale=0.0))["counts"]
        )
    routed = _without(by["groups-bias-unbiased-local"], "aux_loss_counts")
    assert (
        abs(float(ref(routed)["local_aux"][0] - ref(by["groups-bias-unbiased-local"])["local_aux"][0])) > 1e-5
    )


def test_group_limit_bounds_groups_per_token() -> None:
    """Whatever the bias, a token's K experts lie in at most topk_group groups (= EP ranks when n_group is
    the EP size), and gates are the unbiased scores (renormalised, then scaled)."""
    cfg = MoEConfig(**dict(DEEPSEEK, num_experts=16, n_group=4, topk_group=2, top_k=4))
    router = MoELayer(cfg).double().router
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        router.expert_bias.copy_(torch.randn(16, generator=g, dtype=torch.float64))
    x = torch.randn(200, 16, generator=g, dtype=torch.float64)
    out = router(x)
    groups_per_token = [len(set((row // 4).tolist())) for row in out.topk_idx_TK]
    assert max(groups_per_token) <= 2
    s = torch.sigmoid(x @ router.weight.t()).gather(1, out.topk_idx_TK)
    close(out.gates_TK, 2.5 * s / s.sum(1, keepdim=True), "gates: unbiased, renormalised, scaled")


_EP_RESULTS: dict[int, list] = {}


def ep_results(world: int) -> list:
    """Every rank's results for ``ep_cases(world)``: one launch per world size, shared by the tests."""
    if world not in _EP_RESULTS:
        _EP_RESULTS[world] = run_ranks(arch_case_worker, world, ep_cases(world), timeout=400)
    return _EP_RESULTS[world]


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_oracle(world: int) -> None:
    cases = ep_cases(world)
    results = ep_results(world)
    for i, case in enumerate(cases):
        check_against_oracle(case, [r[i] for r in results])


@pytest.mark.parametrize("world", [2, 4])
def test_dedup_halves_the_wire_under_device_limited_routing(world: int) -> None:
    """Device-limited routing (n_group = EP, topk_group 1, K = 2) puts a token's two experts on one rank:
    "dedup" sends it there once, so at most 0.55x the rows of "pairs" cross ranks (each case is also
    checked against the oracle above, and here against its "pairs" twin)."""
    names = [c.name for c in ep_cases(world)]
    results = ep_results(world)
    i, j = names.index("device-limited-one"), names.index("dedup-device-limited-one")
    pairs = sum(r[i]["wire_rows"] for r in results)
    dedup = sum(r[j]["wire_rows"] for r in results)
    assert pairs > 0 and dedup <= 0.55 * pairs, (dedup, pairs)
    for twin in DEDUP_TWINS:
        a, b = names.index(twin), names.index(f"dedup-{twin}")
        for r, got in enumerate(results):
            for key in (
                "hidden",
                "grad_x",
                "grad_router",
                "grad_w1",
                "grad_w2",
                "grad_ws1",
                "grad_ws2",
                "grad_wg",
            ):
                if got[a].get(key) is not None:
                    close(got[b][key], got[a][key], f"{twin} rank {r} {key}")


@pytest.mark.parametrize("world", [2, 4])
def test_shared_expert_overlap_changes_no_bit(world: int) -> None:
    """overlap_shared (the dispatch all-to-all in flight while the shared experts run, and its backward
    while theirs runs) against the same case without it, both dispatchers, a rank with no tokens: the
    output, aux loss and every gradient bit for bit (each twin is also checked against the oracle)."""
    names = [c.name for c in ep_cases(world)]
    results = ep_results(world)
    keys = ("hidden", "aux", "grad_x", "grad_router", "grad_w1", "grad_w2", "grad_ws1", "grad_ws2", "grad_wg")
    for twin in OVERLAP_TWINS:
        a, b = names.index(twin), names.index(f"overlap-{twin}")
        for r, got in enumerate(results):
            assert got[b]["wire_rows"] == got[a]["wire_rows"], twin
            for key in keys:
                if got[a].get(key) is None:
                    assert got[b].get(key) is None, (twin, key)
                    continue
                assert torch.equal(got[b][key], got[a][key]), f"{twin} rank {r} {key}"
    assert any(names.index(f"overlap-{t}") for t in OVERLAP_TWINS if "dedup" in t)


def test_fp32_pair_lists_and_overlap_change_no_bit() -> None:
    """dedup's (row, gate) lists travel in the gates' fp32 (8 bytes a pair), not fp64: at EP 2 in fp32,
    with shared experts and group-limited routing, outputs and every gradient equal the fp64-list run's bit
    for bit, and the dispatch sends 8 bytes fewer per pair that crosses; overlap_shared changes no bit
    either. The timers' placement (docs/profiler.md): the shared experts' backward ends after the routed
    experts' backward span (bwd experts_start .. experts_end), overlap on or off, and with overlap the
    forward dispatch is timed in two spans (launch, then the wait after the shared experts)."""
    cfg = dict(DEEPSEEK, d_model=16, d_ff=16, top_k=4, n_group=2, topk_group=2, bias_update_rate=0.0)
    for got in run_ranks(pair_list_worker, 2, dict(cfg, dispatch="dedup"), [24, 40]):
        a = got["fp32"]
        for other in ("fp64", "fp32-overlap"):
            b = got[other]
            assert len(a["tensors"]) == len(b["tensors"]) > 5
            for x, y in zip(a["tensors"], b["tensors"], strict=True):
                assert x.dtype == torch.float32 and torch.equal(x, y), other
        row_bytes = a["wire_rows"] * 16 * 4
        pairs = (a["wire_bytes"] - row_bytes) // 8
        assert pairs > a["wire_rows"] and got["fp64"]["wire_bytes"] - row_bytes == 16 * pairs
        for name in ("fp32", "fp32-overlap"):
            ev = got[name]["events"]
            end = ev.index("bwd:experts_end")
            assert ev.index("bwd:experts_start") < end < ev.index("bwd:shared_w2_grad"), (name, ev)
            assert end < ev.index("bwd:shared_w1_grad"), (name, ev)
            waits = [e for e in ev if e.startswith("fwd:dispatch")]
            two = ["fwd:dispatch_start", "fwd:dispatch_end", "fwd:dispatch_wait", "fwd:dispatch_ready"]
            assert waits == (two if name == "fp32-overlap" else two[:2]), (name, ev)


def test_pair_list_dtype() -> None:
    from moe_dist.moe.dedup import pair_list_dtype

    assert pair_list_dtype(torch.float32, 1 << 24) == torch.float32
    assert pair_list_dtype(torch.bfloat16, 100) == torch.float32
    assert pair_list_dtype(torch.float32, (1 << 24) + 1) == torch.float64  # rows past fp32's exact integers
    assert pair_list_dtype(torch.float64, 100) == torch.float64


def test_swiglu_grouped_mm_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 SwiGLU takes F.grouped_mm with the fused [L, D, 2F] weight (asserted); it matches the per-expert
    fallback to 1e-6 and the fp64 oracle to fp32 accuracy (norm-relative 1e-4)."""
    import moe_dist.moe.experts as moe_experts

    case = Case("gmm-swiglu", dict(DEEPSEEK, seq_aux_loss_coef=0.0, shared_expert_gate=True), [64], seed=9)
    t = make_tensors(case)
    assert moe_experts.grouped_mm_ok(t["xs"][0].float(), t["w1"].float())
    gmm, _ = fp32_run(case, t)
    monkeypatch.setattr("moe_dist.moe.experts.grouped_mm_ok", lambda x, w: False)
    loop, _ = fp32_run(case, t)
    ref = oracle(case, t)
    assert_fp32_paths_match(gmm, loop, ref)


def test_shared_experts_are_dense_params() -> None:
    """expert_params (EP-local, checkpointed per EP rank) holds the routed experts only; the shared experts
    and their gate are dense (replicated, world-averaged). active_params counts 3DF per gated expert."""
    moe = MoEConfig(
        d_model=16,
        d_ff=8,
        num_experts=4,
        top_k=2,
        activation="swiglu",
        num_shared_experts=2,
        shared_expert_gate=True,
    )
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, seq_len=8, d_ff_dense=32, moe=moe)
    model = MoETransformer(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    experts = {names[id(p)] for p in expert_params(model)}
    dense = {names[id(p)] for p in dense_params(model)}
    assert experts == {f"blocks.{i}.ffn.experts.{w}" for i in (0, 1) for w in ("w1", "w2")}
    shared = {n for n in names.values() if ".shared_experts." in n}
    assert shared == {f"blocks.{i}.ffn.shared_experts.{w}" for i in (0, 1) for w in ("w1", "w2", "gate")}
    assert shared <= dense
    assert model.blocks[0].ffn.experts.w1.shape == (4, 16, 16)
    assert model.blocks[0].ffn.shared_experts.w1.shape == (16, 32)
    n_dense = sum(p.numel() for p in dense_params(model))
    assert active_params(model, cfg) == n_dense + 2 * 2 * 3 * 16 * 8
    out = model(torch.randint(0, 256, (2, 8)))
    (out.logits_BSV.square().mean() + out.aux_loss).backward()
    assert all(p.grad is not None for p in model.blocks[0].ffn.shared_experts.parameters())


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(activation="reglu"), "activation"),
        (dict(num_shared_experts=-1), "num_shared_experts must be >= 0"),
        (dict(num_shared_experts=1, shared_d_ff=0), "shared_d_ff"),
        (dict(shared_expert_gate=True), "needs moe.num_shared_experts"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(routed_scaling_factor=float("inf")), "routed_scaling_factor"),
        (dict(n_group=4), "set together"),
        (dict(n_group=3, topk_group=1), "divide num_experts=8"),
        (dict(n_group=4, topk_group=5), "topk_group=5"),
        (dict(n_group=4, topk_group=0), "topk_group=0"),
        (dict(n_group=4, topk_group=1, top_k=3), "top_k=3 exceeds the 2 experts"),
        (dict(n_group=4, topk_group=2, noisy_gating=True), "cannot be combined"),
        (dict(seq_aux_loss_coef=-1.0), "seq_aux_loss_coef"),
        (dict(aux_loss_counts="biased"), "aux_loss_counts must be one of .*got 'biased'"),
        (dict(dispatch="dedupe"), "dispatch must be one of .*got 'dedupe'; did you mean 'dedup'"),
        (dict(dispatch=None), "dispatch must be one of"),
        (dict(n_group=2.0, topk_group=1), "n_group must be int"),
        (dict(overlap_shared=True), "overlap_shared needs moe.num_shared_experts >= 1"),
        (dict(num_shared_experts=1, overlap_shared="yes"), "overlap_shared must be bool"),
    ],
)
def test_bad_config(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        MoEConfig(**{**dict(num_experts=8, d_model=16, d_ff=32, top_k=2), **kwargs})


def test_resume_reads_a_config_saved_before_aux_loss_counts() -> None:
    """A checkpoint's stored config from before the field existed trained with routed counts: resuming it
    under the default is no change, under "unbiased" a refused model change."""
    demo = Path(__file__).resolve().parents[2] / "configs" / "cpu_demo.yaml"
    now = load_config(demo).to_dict()
    saved = copy.deepcopy(now)
    del saved["model"]["moe"]["aux_loss_counts"]
    assert config_changes(saved, now) == ([], [])
    other = load_config(demo, ["model.moe.aux_loss_counts=unbiased"]).to_dict()
    assert config_changes(saved, other) == (["model.moe.aux_loss_counts: 'routed' -> 'unbiased'"], [])
    # the same for moe.overlap_shared (issue 27): a checkpoint from before it ran without the overlap
    del saved["model"]["moe"]["overlap_shared"]
    assert config_changes(saved, now) == ([], [])
