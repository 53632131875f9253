"""The rebalance loop in training (#14): ``parallel.placement: balanced`` re-places the experts mid-run and
moves weights and AdamW state exactly, so the run trains as if no expert had ever moved; a resume from a
checkpoint taken after a rebalance is bit-exact; DeepSpeed refuses it.

One launch of 4 gloo ranks (EP 2 x DP 2) runs, in fp64 (``fp64_runs_worker``):
    moved    placement=balanced, one redundant slot per rank, a rebalance every 2 steps (after steps 1 and 3,
             0-based as in the JSONL files; none after the final step 5), checkpoints after 3 and 6 steps;
    still    the same run with the contiguous placement and no replicas (nothing ever moves);
    resumed  ``moved`` resumed from its step-3 checkpoint (3 steps done): the window of the rebalance after
             step 3 holds step 2, so it must come from the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_dist.checkpoint.files import load_obj
from moe_dist.errors import ConfigError
from moe_dist.moe.config import MoEConfig
from moe_dist.moe.layer import MoELayer
from moe_dist.moe.placement import Placement
from moe_dist.training.config import config_from_dict
from tests.helpers.launch import run_ranks
from tests.training.train_workers import fp64_runs_worker, tiny

STEPS = 6
N = 8


def run_cfg(out: Path, name: str, **parallel) -> dict:
    return tiny(
        out_dir=str(out),
        name=name,
        model={"moe": {"num_experts": N, "top_k": 2, "d_ff": 16, "z_loss_coef": 1e-3}},
        data={"kind": "synthetic", "max_bytes": 60_000, "zipf_s": 2.0},
        parallel={"ep": 2, **parallel},
        train={
            "steps": STEPS,
            "ckpt_every": 3,
            "keep_last": 5,
            "eval_every": STEPS,
            "val_sequences": 4,
            "micro_batch": 2,
        },
    )


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("rebal")
    moved = run_cfg(out, "moved", placement="balanced", redundant_experts=1, rebalance_every=2)
    plan = [
        (moved, None),
        (run_cfg(out, "still"), None),
        (dict(moved, name="resumed"), ("resume", "moved", 3)),
    ]
    per_rank = run_ranks(fp64_runs_worker, 4, plan, timeout=600)
    res: dict = {"out": out}
    for i, name in enumerate(("moved", "still", "resumed")):
        res[name] = {
            "ranks": [r[i] for r in per_rank],
            "metrics": jsonl(out / name / "metrics.jsonl"),
            "straggler": jsonl(out / name / "straggler.jsonl"),
            "routing": jsonl(out / name / "routing.jsonl"),
        }
    return res


def losses(run: dict) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in run["metrics"] if "loss" in r}


def by_expert(run: dict, layer: int) -> dict[int, list[dict[str, torch.Tensor]]]:
    """Logical expert -> every copy of its tensors (each slot holding it, on every rank)."""
    out: dict[int, list] = {}
    for got in run["ranks"]:
        lay = got["layers"][layer]
        for s, e in enumerate(lay["slot_experts"]):
            out.setdefault(e, []).append({k: t[s] for k, t in lay["t"].items()})
    return out


def test_rebalanced_run_trains_as_if_nothing_moved(runs: dict) -> None:
    moved, still = runs["moved"], runs["still"]
    a, b = losses(moved), losses(still)
    assert sorted(a) == sorted(b) == list(range(STEPS))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-9, abs=0), (step, a[step], b[step])
    # the placement did change: straggler.jsonl says so, and bytes moved
    st = moved["straggler"]
    assert [r["step"] for r in st] == list(range(STEPS))
    assert max(r["placement_version"] for r in st) > 0, st
    assert any(r["migration_bytes"] > 0 for r in st), st
    for r in st:
        rebalanced = (r["step"] + 1) % 2 == 0  # the record of step index k is optimizer step k + 1
        if not rebalanced:
            assert r["migration_ms"] == 0 and r["migration_bytes"] == 0, r
        assert r["replica_sync_ms"] > 0, r
    # routing.jsonl: the window's mean per-sender counts on rebalance steps, [layer][EP rank][expert]
    rn = {r["step"]: r for r in moved["routing"] if "tokens_per_expert_RN" in r}
    assert sorted(rn) == [1, 3], sorted(rn)  # none after the final step 5 (issue 23)
    for r in rn.values():
        assert r["rebalance_window_steps"] == 2
        assert [len(x) for x in r["tokens_per_expert_RN"]] == [2, 2]
        assert all(len(row) == N for x in r["tokens_per_expert_RN"] for row in x)
        # kept pairs of the window, per step: top_k x tokens of the world (dropless)
        total = sum(sum(row) for row in r["tokens_per_expert_RN"][0])
        assert total == 2 * 2 * 16 * 4, total
    # every rank of both EP groups ends with the same table (one global placement)
    for layer in range(2):
        tables = {json.dumps(got["layers"][layer]["placement"]) for got in moved["ranks"]}
        assert len(tables) == 1, tables


@pytest.mark.parametrize("layer", [0, 1])
def test_replicas_equal_and_experts_match_the_never_moved_run(runs: dict, layer: int) -> None:
    """After the last step's rebalance: every copy of an expert (replicas, DP copies) is bitwise equal, and
    equals the never-moved run's expert (weights, exp_avg, exp_avg_sq) to fp64 rounding."""
    moved, still = by_expert(runs["moved"], layer), by_expert(runs["still"], layer)
    assert sorted(moved) == sorted(still) == list(range(N))
    assert any(len(c) > 2 for c in moved.values()), "some expert is replicated (more than its 2 DP copies)"
    for e, copies in moved.items():
        for c in copies[1:]:
            for k, t in c.items():
                assert torch.equal(t, copies[0][k]), (e, k)
        for k, t in copies[0].items():
            ref = still[e][0][k]
            torch.testing.assert_close(t, ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()), msg=f"{e} {k}")


def test_resume_after_a_rebalance_is_bit_exact(runs: dict) -> None:
    moved, resumed = runs["moved"], runs["resumed"]
    a, b = losses(moved), losses(resumed)
    assert sorted(b) == list(range(STEPS)), b  # steps 0-2 kept from the copy, 3-5 trained again
    for step in range(3, STEPS):
        assert a[step] == b[step], (step, a[step], b[step])
    checks = [r["resume_check"] for r in resumed["metrics"] if "resume_check" in r]
    assert checks == ["pass"]
    # the rebalance after step 3 (window: steps 2 and 3, step 2 from the checkpoint) gave the same placements
    # and the same bits in every slot
    for ga, gb in zip(moved["ranks"], resumed["ranks"], strict=True):
        for la, lb in zip(ga["layers"], gb["layers"], strict=True):
            assert la["placement"] == lb["placement"]
            for k in la["t"]:
                assert torch.equal(la["t"][k], lb["t"][k]), k
    # the step-3 checkpoint holds the window opened by the rebalance after step 2: step 3's pairs alone
    window = load_obj(runs["out"] / "moved" / "checkpoints" / "step_00000003" / "dense.pt")["rebalance"]
    assert window["since"] == 2 and window["counts_LRN"].shape == (2, 2, N)
    assert window["counts_LRN"].sum(dim=(1, 2)).tolist() == [256.0, 256.0]  # top_k x 128 tokens, per layer
    st = {r["step"]: r for r in resumed["straggler"]}
    assert (
        st[STEPS - 1]["placement_version"]
        == {r["step"]: r for r in moved["straggler"]}[STEPS - 1]["placement_version"]
    )


def test_deepspeed_refuses_balanced_placement_in_one_line() -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(
            tiny(engine="deepspeed", parallel={"ep": 2, "placement": "balanced", "rebalance_every": 5})
        )
    msg = str(e.value)
    assert "\n" not in msg and "engine=deepspeed" in msg and "placement=balanced" in msg, msg


def test_set_placement_switches_tables_and_refuses_another_shape() -> None:
    """A layer without an EP group (one rank): the slot table, owned slots and route table follow; the
    stacked slots are left alone; another number of experts, ranks or slots is refused."""
    layer = MoELayer(MoEConfig(num_experts=4, d_model=8, d_ff=8, top_k=2), init_seed=0)
    w1 = layer.experts.w1.detach().clone()
    p = Placement(4, ((3, 1, 0, 2),), version=5)
    layer.set_placement(p)
    assert layer.placement is p and layer.slot_experts == [3, 1, 0, 2] and layer.owned_slots == [0, 1, 2, 3]
    assert layer.route_slot_N.tolist() == [2, 1, 3, 0]
    assert torch.equal(layer.experts.w1, w1)
    for bad in (Placement(4, ((0, 1), (2, 3))), Placement(2, ((0, 1),)), Placement(5, ((0, 1, 2, 3, 4),))):
        with pytest.raises(ConfigError, match="must keep 4 experts over 1 EP rank"):
            layer.set_placement(bad)
