"""Megatron-Core 0.16.1 itself as the oracle for the terms it defines: its routing, Switch, z and
sequence-wise losses and its expert-bias update are called on our router's logits, in fp64 where the
function allows (its routing and its softmax scores for the aux loss compute in fp32; those comparisons
are held to fp32 rounding).

Its router recipes (``TopKRouter._apply_aux_loss``, ``_apply_seq_aux_loss``, ``_apply_global_aux_loss``) are
its own code, called unbound on a stand-in ``self`` that holds what they read (coefficient, top-K, groups)
and records the loss they attach. Multi-rank cases run our layer on gloo ranks (one spawn of 4 for EP 2
and 4);
Megatron's side runs here, per rank, with each of its all-reduces handed the other ranks' contributions
(``_SumOverRanks``), so that no rank pays Megatron's import.

Where we differ on purpose the test asserts the documented relation (README, "How α·Σf·P relates to other
systems"): our P_i is the mean of the raw scores s (the seed's), Megatron's the mean of s / Σ_j s_j, so for
sigmoid scores ours equals Megatron's recipe fed the raw scores; with ``aux_loss_counts: routed`` under a
bias, ours equals its recipe fed the routing map instead of its unbiased one.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from moe_dist import MoEConfig, MoELayer
from tests.helpers.asserts import close_in_dtype as close
from tests.helpers.launch import run_ranks
from tests.helpers.oracle import Case
from tests.moe.megatron_workers import megatron_case_worker

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed": not needed here
        from megatron.core.tensor_parallel import mappings
        from megatron.core.transformer.moe import moe_utils
        from megatron.core.transformer.moe.router import TopKRouter
except Exception as e:  # noqa: BLE001 - any failure to import means no oracle here; say which
    pytest.skip(
        f"megatron-core cannot be imported here ({type(e).__name__}: {e}); pip install -e '.[test]' installs "
        "megatron-core==0.16.1 on Linux x86_64/aarch64 with CPython 3.10-3.13",
        allow_module_level=True,
    )

F64 = torch.float64
N, D = 8, 16
DSV3 = dict(
    num_experts=N,
    d_model=D,
    d_ff=16,
    top_k=2,
    score_func="sigmoid",
    normalize_topk=True,
    routed_scaling_factor=2.5,
    n_group=4,
    topk_group=1,  # Megatron scores a group by its top K/topk_group = 2 experts, as DeepSeek-V3 (and we) do
    bias_update_rate=1e-3,
    aux_loss_coef=1e-2,
    aux_loss_counts="unbiased",
    seq_aux_loss_coef=1e-2,
    z_loss_coef=1e-3,
    balance_scope="global_batch",
)
SEQ_LEN, MICRO, TOKENS = 8, 2, 32  # per rank: 2 micro-batches of 2 sequences of 8 tokens
CASES = {
    "unbiased": dict(DSV3),
    "routed": dict(DSV3, aux_loss_counts="routed"),
    "local": dict(DSV3, balance_scope="local"),
    "softmax": dict(
        DSV3,
        score_func="softmax",
        normalize_topk=False,
        routed_scaling_factor=1.0,
        n_group=None,
        topk_group=None,
        bias_update_rate=0.0,
    ),
}
CASES["softmax-local"] = dict(CASES["softmax"], balance_scope="local")


def cases(world: int) -> list[Case]:
    return [
        Case(name, cfg, [TOKENS] * world, seed=11 + i, bias_scale=0.3, seq_len=SEQ_LEN)
        for i, (name, cfg) in enumerate(CASES.items())
    ]


class _Group:
    """What Megatron asks of a process group here: its size."""

    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size


class _SumOverRanks:
    """torch.distributed.all_reduce (SUM) as seen by one rank: adds the other ranks' contributions, queued
    in call order."""

    def __init__(self) -> None:
        self.pending: list[torch.Tensor] = []

    def __call__(self, tensor, op=None, group=None, async_op=False):
        tensor += torch.as_tensor(self.pending.pop(0), dtype=tensor.dtype)


@pytest.fixture
def all_reduce(monkeypatch: pytest.MonkeyPatch) -> _SumOverRanks:
    fake = _SumOverRanks()
    monkeypatch.setattr(torch.distributed, "all_reduce", fake)
    # Megatron falls back to its global TP group when torch.distributed is not initialised; we pass groups
    monkeypatch.setattr(mappings, "get_tensor_model_parallel_group_if_none", lambda g, **_: g)
    return fake


class _Router:
    """The ``self`` that TopKRouter's aux-loss recipes read; TP = CP = 1, ``world`` data-parallel ranks."""

    get_aux_loss_coeff = TopKRouter.get_aux_loss_coeff
    _apply_aux_loss = TopKRouter._apply_aux_loss
    _apply_seq_aux_loss = TopKRouter._apply_seq_aux_loss
    _apply_global_aux_loss = TopKRouter._apply_global_aux_loss

    def __init__(self, kind: str, coeff: float, topk: int, world: int = 1) -> None:
        self.routing_type = kind
        self.topk = topk
        self.config = SimpleNamespace(moe_aux_loss_coeff=coeff, num_moe_experts=N, moe_router_fusion=False)
        self.tp_cp_group = _Group(1)
        self.tp_dp_cp_group = _Group(world)
        # Megatron's buffers (float32, as its router registers them)
        self.global_tokens_per_expert = torch.zeros(N, dtype=torch.float32)
        self.ga_steps = torch.zeros((), dtype=torch.float32)
        self.loss: torch.Tensor | None = None

    def attach_and_log_load_balancing_loss(self, activation, coeff, aux_loss, *args, **kwargs):
        self.loss = aux_loss
        return activation


def aux_inputs(logits_TN: torch.Tensor, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron's routing map and scores for its aux losses (top-K of the unbiased scores, no groups)."""
    return moe_utils.compute_routing_scores_for_aux_loss(logits_TN, cfg["top_k"], cfg["score_func"])


def megatron_seq_loss(
    logits_TN: torch.Tensor, cfg: dict, scores_TN: torch.Tensor | None = None
) -> torch.Tensor:
    """Megatron's seq_aux_loss on one rank; our rows are [B, S] (sequences back to back), its are [S, B]."""
    S = SEQ_LEN
    B = logits_TN.shape[0] // S

    def to_sb(z):  # [B*S, N] -> [S*B, N]
        return z.reshape(B, S, -1).transpose(0, 1).reshape(S * B, -1)

    logits = to_sb(logits_TN)
    routing_map, scores = aux_inputs(logits, cfg)
    router = _Router("seq_aux_loss", cfg["seq_aux_loss_coef"], cfg["top_k"])
    router._apply_seq_aux_loss(None, scores if scores_TN is None else to_sb(scores_TN), routing_map, S, B)
    return router.loss


def megatron_routing(logits_TN: torch.Tensor, cfg: dict, bias_N: torch.Tensor | None):
    """topk_routing_with_score_function with the configuration that means ours (README's table)."""
    softmax = cfg["score_func"] == "softmax"
    return moe_utils.topk_routing_with_score_function(
        logits_TN,
        cfg["top_k"],
        use_pre_softmax=softmax and not cfg.get("normalize_topk", False),
        num_groups=cfg.get("n_group"),
        group_topk=cfg.get("topk_group"),
        scaling_factor=cfg.get("routed_scaling_factor", 1.0),
        score_function=cfg["score_func"],
        expert_bias=bias_N if cfg.get("bias_update_rate", 0) > 0 else None,
    )


# --- routing ---------------------------------------------------------------------------------------------


def routing_grid() -> list[tuple[str, dict]]:
    """Megatron's sigmoid router renormalises the K gates exactly when K > 1; its softmax router renormalises
    when it takes the softmax after top-K (pre_softmax off). Groups: Megatron scores a group by its top
    K/topk_group experts, DeepSeek-V3 and we by the top 2, so the grid's groups have K = 2 topk_group."""
    grid = []
    for K in (1, 2, 4, 8):
        groups = {1: None, 2: (8, 1), 4: (4, 2), 8: (8, 4)}[K]
        for normalize in (False, True):
            grid.append(
                (
                    f"softmax-K{K}-{'post' if normalize else 'pre'}",
                    dict(score_func="softmax", top_k=K, normalize_topk=normalize),
                )
            )
        grid.append((f"sigmoid-K{K}", dict(score_func="sigmoid", top_k=K, normalize_topk=K > 1)))
        grid.append(
            (
                f"sigmoid-K{K}-bias-scaled",
                dict(
                    score_func="sigmoid",
                    top_k=K,
                    normalize_topk=K > 1,
                    bias_update_rate=1e-3,
                    routed_scaling_factor=2.5,
                ),
            )
        )
        if groups is not None:
            g = dict(n_group=groups[0], topk_group=groups[1])
            grid.append(
                (
                    f"softmax-K{K}-pre-groups-scaled",
                    dict(score_func="softmax", top_k=K, routed_scaling_factor=2.5, **g),
                )
            )
            grid.append(
                (
                    f"sigmoid-K{K}-bias-groups",
                    dict(score_func="sigmoid", top_k=K, normalize_topk=K > 1, bias_update_rate=1e-3, **g),
                )
            )
    return grid


def test_routing_matches_megatron() -> None:
    """Top-K set and gates of topk_routing_with_score_function equal our router's on the same logits."""
    n = 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, D, generator=g, dtype=F64)
    weight = torch.randn(n, D, generator=g, dtype=F64) * 0.5
    bias = torch.randn(n, generator=g, dtype=F64) * 0.3
    steered = 0
    for name, kw in routing_grid():
        cfg = MoEConfig(num_experts=n, d_model=D, **kw)
        router = MoELayer(cfg).double().router
        with torch.no_grad():
            router.weight.copy_(weight)
            router.expert_bias.copy_(bias)
            out = router(x)
        ours_map = torch.zeros(64, n, dtype=torch.bool).scatter_(1, out.topk_idx_TK, True)
        ours_probs = torch.zeros(64, n, dtype=F64).scatter_(1, out.topk_idx_TK, out.gates_TK)
        probs, routing_map = megatron_routing(out.logits_TN, dict(kw), router.expert_bias)
        assert torch.equal(routing_map, ours_map), f"{name}: top-K sets differ"
        # its scores are computed in fp32 (softmax(..., dtype=float32), sigmoid(logits.float()))
        torch.testing.assert_close(
            probs, ours_probs, rtol=2e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: gates: {m}"
        )
        if "bias" in name or "groups" in name:
            plain = torch.zeros_like(ours_map).scatter_(
                1, out.scores_TN.topk(kw["top_k"], dim=1).indices, True
            )
            steered += int(not torch.equal(plain, ours_map))
    assert steered >= 6, "the bias and the group limit should change the choice in most steered cases"


# --- losses at EP 1 (in-process), 2 and 4 (one spawn each) ----------------------------------------------


def megatron_switch(
    cfg: dict, routers: dict, all_reduce: _SumOverRanks, maps: list, scores: list, kind: str, label: str = ""
) -> list[torch.Tensor]:
    """Each rank's loss from Megatron's ``kind`` recipe ("aux_loss": reduced over TP x CP only, i.e. each
    data-parallel rank alone; "global_aux_loss": over every rank, with a running count kept in
    ``routers[label]``, one stand-in router per rank)."""
    world = len(maps)
    losses = []
    for r in range(world):
        if kind == "global_aux_loss":
            mine = routers.setdefault(
                label, [_Router(kind, cfg["aux_loss_coef"], cfg["top_k"], world) for _ in range(world)]
            )[r]
            all_reduce.pending = [sum(maps[q].sum(0) for q in range(world) if q != r)]
            mine._apply_global_aux_loss(None, scores[r], maps[r])
        else:
            mine = _Router("aux_loss", cfg["aux_loss_coef"], cfg["top_k"])
            mine._apply_aux_loss(None, scores[r], maps[r])
        losses.append(mine.loss)
    return losses


def check_rank_results(world: int, per_rank: list[list[dict]], all_reduce: _SumOverRanks) -> None:
    for ci, case in enumerate(cases(world)):
        cfg = case.cfg
        res = [per_rank[r][ci] for r in range(world)]
        # one stand-in router per rank and per recipe fed: global_aux_loss keeps a running count in it
        routers: dict[str, list[_Router]] = {}
        tol = 2e-6 if cfg["score_func"] == "softmax" else 1e-12  # its softmax scores are fp32
        local_bias_counts = [torch.zeros(N, dtype=torch.float32) for _ in range(world)]
        for m in range(MICRO):
            logits = [res[r]["steps"][m]["logits"] for r in range(world)]
            terms = [res[r]["steps"][m]["terms"] for r in range(world)]
            aux = [aux_inputs(z, cfg) for z in logits]
            raw = [
                torch.sigmoid(z) if cfg["score_func"] == "sigmoid" else torch.softmax(z, -1) for z in logits
            ]
            routed_maps = [megatron_routing(z, cfg, res[0]["bias_before"])[1] for z in logits]
            for r in range(world):
                local_bias_counts[r] += routed_maps[r].sum(0)  # TopKRouter._apply_expert_bias
            what = f"EP {world}, {case.name}, micro-batch {m}"

            if cfg["balance_scope"] == "local":
                # Megatron's aux_loss = our local scope: with its own scores for softmax (s = s'), fed the raw
                # s for sigmoid (the documented relation)
                scores = [a[1] for a in aux] if cfg["score_func"] == "softmax" else raw
                got = megatron_switch(cfg, routers, all_reduce, [a[0] for a in aux], scores, "aux_loss")
                for r in range(world):
                    close(terms[r]["switch"], got[r], f"{what}, rank {r}: switch vs aux_loss", rtol=tol)
                    seq = megatron_seq_loss(logits[r], cfg)
                    close(terms[r]["seq"], seq, f"{what}, rank {r}: seq", rtol=tol)
                    close(terms[r]["z"], moe_utils.z_loss_func(logits[r], cfg["z_loss_coef"]), f"{what}: z")
                continue
            if case.name == "softmax":
                # s = s' for softmax: with Megatron's own (fp32) scores equal to fp32 rounding; fed our fp64
                # softmax, equal to fp64 rounding
                got = megatron_switch(
                    cfg,
                    routers,
                    all_reduce,
                    [a[0] for a in aux],
                    [a[1] for a in aux],
                    "global_aux_loss",
                    "own",
                )
                close(terms[0]["switch"], sum(got), f"{what}: switch vs global_aux_loss", rtol=tol)
                got = megatron_switch(
                    cfg, routers, all_reduce, [a[0] for a in aux], raw, "global_aux_loss", "fp64"
                )
                close(terms[0]["switch"], sum(got), f"{what}: switch vs global_aux_loss on fp64 scores")
            elif case.name == "unbiased":
                got = megatron_switch(cfg, routers, all_reduce, [a[0] for a in aux], raw, "global_aux_loss")
                close(terms[0]["switch"], sum(got), f"{what}: switch vs global_aux_loss (P over raw s)")
            elif case.name == "routed":
                got = megatron_switch(cfg, routers, all_reduce, routed_maps, raw, "global_aux_loss")
                close(terms[0]["switch"], sum(got), f"{what}: switch vs global_aux_loss on the routing map")
            if cfg["bias_update_rate"] > 0:  # not vacuous: the bias and the groups change the counts
                unbiased_N = sum(a[0].sum(0) for a in aux)
                assert not torch.equal(unbiased_N, sum(m_.sum(0) for m_ in routed_maps)), f"{what}: counts"
            # global scope: the mean over every rank's sequences/tokens = the mean of Megatron's per-rank
            # (per data-parallel rank) losses, each rank holding as many sequences and tokens
            for r in range(world):
                seq = sum(megatron_seq_loss(z, cfg) for z in logits) / world
                close(terms[r]["seq"], seq, f"{what}, rank {r}: seq vs mean of seq_aux_loss", rtol=tol)
                z = sum(moe_utils.z_loss_func(z_, cfg["z_loss_coef"]) for z_ in logits) / world
                close(terms[r]["z"], z, f"{what}, rank {r}: z vs mean of z_loss_func")
        if cfg["bias_update_rate"] > 0:
            # one optimizer step of MICRO micro-batches: Megatron's _update_router_expert_bias
            window = res[0]["window_counts"]
            close(window, sum(local_bias_counts).to(F64), f"EP {world}, {case.name}: bias-update counts")
            for r in range(world):
                all_reduce.pending = [sum(local_bias_counts[q] for q in range(world) if q != r)]
                new = moe_utils.get_updated_expert_bias(
                    local_bias_counts[r].clone(), res[r]["bias_before"], cfg["bias_update_rate"]
                )
                step_ours = res[r]["bias_after"] - res[r]["bias_before"]
                step_theirs = new - res[r]["bias_before"]
                assert torch.equal(torch.sign(step_ours), torch.sign(step_theirs)), f"rank {r}: bias signs"
                torch.testing.assert_close(res[r]["bias_after"], new.to(F64), rtol=0, atol=1e-9)
                assert int((step_ours != 0).sum()) > 0


@pytest.fixture
def patch_groups(monkeypatch: pytest.MonkeyPatch, all_reduce: _SumOverRanks) -> _SumOverRanks:
    monkeypatch.setattr(moe_utils.parallel_state, "get_tensor_and_data_parallel_group", lambda **_: _Group(0))
    return all_reduce


@pytest.mark.parametrize("spawned", [1, 4], ids=["EP1", "EP2-and-EP4"])
def test_losses_and_bias_update_match_megatron(spawned: int, patch_groups: _SumOverRanks) -> None:
    """Switch (both count modes, global_batch and local scope), sequence-wise, z-loss and the bias update
    over one step of 2 micro-batches, at EP 1 (in-process), and EP 2 and 4 in one spawn of 4 ranks (two
    EP-2 groups side by side, each checked)."""
    if spawned == 1:
        check_rank_results(1, [megatron_case_worker(0, 1, {1: cases(1)}, MICRO)[1]], patch_groups)
        return
    per_rank = run_ranks(megatron_case_worker, 4, {2: cases(2), 4: cases(4)}, MICRO, timeout=240)
    check_rank_results(4, [res[4] for res in per_rank], patch_groups)
    for pair in (0, 1):
        check_rank_results(2, [per_rank[2 * pair + r][2] for r in range(2)], patch_groups)


# --- single process: gradients, and the HF DeepSeek-V3 path ---------------------------------------------


def test_seq_and_switch_gradients_match_megatron(all_reduce: _SumOverRanks) -> None:
    """With a bias and groups on, fp64: our sequence-wise loss and its router gradient equal Megatron's
    seq_aux_loss recipe to 1e-12; our Switch loss (unbiased counts) its aux_loss recipe on raw scores."""
    cfg = dict(DSV3, balance_scope="global")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, SEQ_LEN, D, generator=g, dtype=F64)
    layer = MoELayer(MoEConfig(**cfg)).double()
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(N, D, generator=g, dtype=F64) * 0.5)
        layer.router.expert_bias.copy_(torch.randn(N, generator=g, dtype=F64) * 0.3)
    out = layer(x)
    weight = layer.router.weight.detach().clone().requires_grad_()
    logits = x.reshape(-1, D) @ weight.t()
    for term, theirs in (
        ("seq", megatron_seq_loss(logits, cfg)),
        ("switch", _switch_aux_loss(logits, cfg)),
    ):
        close(out.terms[term], theirs, f"{term} value")
        (ours_grad,) = torch.autograd.grad(out.terms[term], layer.router.weight, retain_graph=True)
        (their_grad,) = torch.autograd.grad(theirs, weight, retain_graph=True)
        close(ours_grad, their_grad, f"{term} router gradient", rtol=1e-10)
    # not vacuous: the routing choice differs from the unbiased top-K on these tokens
    assert not torch.equal(out.stats.tokens_per_expert, aux_inputs(logits, cfg)[0].sum(0))


def _switch_aux_loss(logits_TN: torch.Tensor, cfg: dict) -> torch.Tensor:
    routing_map, _ = aux_inputs(logits_TN, cfg)
    router = _Router("aux_loss", cfg["aux_loss_coef"], cfg["top_k"])
    router._apply_aux_loss(None, torch.sigmoid(logits_TN), routing_map)  # P over raw s: the relation
    return router.loss


def test_hf_deepseek_v3_uses_the_papers_terms(all_reduce: _SumOverRanks) -> None:
    """from_hf_block on transformers' DeepseekV3MoE (nonzero e_score_correction_bias, groups): the
    sequence-wise loss is Megatron's seq_aux_loss, and a Switch loss turned on counts as Megatron's."""
    pytest.importorskip("transformers")
    from moe_dist.models.hf import from_hf_block
    from tests.models.hf_workers import make_block

    block = make_block("deepseek_v3", seed=3)
    layer = from_hf_block(block, aux_loss_coef=1e-2)
    assert layer.cfg.aux_loss_counts == "unbiased"
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, SEQ_LEN, D, generator=g, dtype=F64)
    out = layer(x)
    cfg = dict(
        top_k=layer.cfg.top_k,
        score_func="sigmoid",
        seq_aux_loss_coef=layer.cfg.seq_aux_loss_coef,
        aux_loss_coef=1e-2,
    )
    with torch.no_grad():
        logits = layer.router(x.reshape(-1, D)).logits_TN
    close(out.terms["seq"], megatron_seq_loss(logits, cfg), "HF DeepSeek-V3 seq loss")
    close(out.terms["switch"], _switch_aux_loss(logits, cfg), "HF DeepSeek-V3 switch loss")
    assert not torch.equal(out.stats.tokens_per_expert, aux_inputs(logits, cfg)[0].sum(0)), (
        "bias/groups steer"
    )
