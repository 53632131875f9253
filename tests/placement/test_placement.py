"""Expert placements with replicas (#14): the Placement table, the layer under random placements against the
plain fp64 oracle, replicas kept identical by sync_gradients, per-expert checkpoints with replicas, config.

The oracle (tests/oracle.py) knows nothing of placements: a replica computes its expert's FFN, so the
layer's outputs equal the oracle's, and a logical expert's gradient is the sum of its replicas' slot
gradients over all ranks.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from moe_dist.errors import ConfigError
from moe_dist.moe.placement import Placement
from moe_dist.training.config import config_from_dict
from tests.helpers.asserts import close
from tests.helpers.launch import run_ranks
from tests.helpers.oracle import Case, make_tensors, oracle
from tests.placement.placement_workers import launch_worker
from tests.training.train_workers import tiny, train_worker

N = 8
BASE = dict(num_experts=N, d_model=8, d_ff=8, top_k=2, aux_loss_coef=1e-2, z_loss_coef=1e-3)
TOKENS = {2: [24, 40], 4: [20, 33, 16, 28]}
REDUNDANT = {2: 2, 4: 2}


def random_placement(n: int, ep: int, redundant: int, seed: int) -> Placement:
    """Each expert once on a random rank (n/ep per rank), then ``redundant`` replicas per rank of experts
    it does not hold yet, every row shuffled: experts end up with 1 to 1 + ep - 1 replicas."""
    g = random.Random(seed)
    perm = list(range(n))
    g.shuffle(perm)
    L = n // ep
    rows = []
    for r in range(ep):
        row = perm[r * L : (r + 1) * L]
        row += g.sample([e for e in range(n) if e not in row], redundant)
        g.shuffle(row)
        rows.append(tuple(row))
    return Placement(n, tuple(rows))


def cases(world: int) -> list[Case]:
    out = []
    for p_seed in (1, 2):
        placement = random_placement(N, world, REDUNDANT[world], 100 * world + p_seed)
        assert placement.is_replicated()
        for cap in (None, 0.5):
            for fold in (True, False):
                name = f"p{p_seed}-{'cap' if cap else 'dropless'}-{'folded' if fold else 'a2a-counts'}"
                cfg = dict(BASE, capacity_factor=cap, score_func="softmax" if p_seed == 1 else "sigmoid")
                extra = {"placement": placement.to_dict(), "fold": fold}
                out.append(Case(name, cfg, TOKENS[world], seed=10 * world + p_seed, extra=extra))
            # MoEConfig.dispatch="dedup" (issue 27): replicas keep their meaning; counts always travel alone
            name = f"p{p_seed}-{'cap' if cap else 'dropless'}-dedup"
            cfg = dict(cfg, dispatch="dedup")
            out.append(Case(name, cfg, TOKENS[world], seed=10 * world + p_seed, extra=dict(extra, fold=True)))
    return out


_RESULTS: dict[int, list] = {}
CONTIGUOUS_CASE = Case("contig", dict(BASE, capacity_factor=1.0), TOKENS[2], seed=3)


def results_for(world: int) -> list[dict]:
    """Every rank's results of the one launch of each world size: the oracle cases, and at world 2 the
    contiguous comparison, at world 4 the replica-sync runs (``SYNC_*`` below)."""
    if world not in _RESULTS:
        contiguous = CONTIGUOUS_CASE if world == 2 else None
        sync = (SYNC_CASE, SYNC_LAYOUTS, 2) if world == 4 else None
        _RESULTS[world] = run_ranks(launch_worker, world, cases(world), contiguous, sync, timeout=300)
    return _RESULTS[world]


def logical_grads(per_rank: list[dict], key: str) -> torch.Tensor:
    """[N, ...]: each logical expert's gradient = the sum of its replicas' slot gradients on all ranks."""
    first = per_rank[0][key]
    total = first.new_zeros((N, *first.shape[1:]))
    for got in per_rank:
        for s, e in enumerate(got["slot_experts"]):
            total[e] += got[key][s]
    return total


PARAMS = [(w, i, c.name) for w in (2, 4) for i, c in enumerate(cases(w))]


@pytest.mark.parametrize("world,idx,name", PARAMS, ids=[f"R{w}-{n}" for w, _, n in PARAMS])
def test_random_placement_matches_oracle(world: int, idx: int, name: str) -> None:
    case = cases(world)[idx]
    ref = oracle(case, make_tensors(case))
    per_rank = [r["cases"][idx] for r in results_for(world)]
    placement = Placement.from_dict(case.extra["placement"])
    for r, got in enumerate(per_rank):
        assert got["slot_experts"] == list(placement.slot_expert_RL[r])
        close(got["hidden"], ref["hidden"][r], f"rank {r} output")
        close(got["grad_x"], ref["grad_x"][r], f"rank {r} input grad")
        close(got["f"], ref["f"], f"rank {r} f (per logical expert)")
        close(got["aux"], ref["aux"], f"rank {r} aux loss")
        assert torch.equal(got["counts"], ref["counts"]), f"rank {r} counts per logical expert"
        assert got["dropped"] == ref["dropped"], f"rank {r} dropped"
        # the folded counts save the count all-to-all: rows out and back only (dedup too: its token rows
        # per rank ride the folded block, its pair lists the rows' all-to-all)
        assert got["forward_a2a"] == (2 if case.extra["fold"] else 3)
    close(sum(g["grad_router"] for g in per_rank), ref["grad_router"], "router grad summed over ranks")
    close(logical_grads(per_rank, "grad_w1"), ref["grad_w1"], "W1 grad per logical expert")
    close(logical_grads(per_rank, "grad_w2"), ref["grad_w2"], "W2 grad per logical expert")
    if case.cfg["capacity_factor"] is not None:
        assert ref["dropped"] > 0, "the capacity cases must actually drop"
    # some senders use a replica other than the expert's first copy (at EP 4 also on another rank than
    # their own: at EP 2 a replicated expert is on both ranks, so every sender has its own)
    S = placement.slots_per_rank
    first = [placement.owner(e)[0] * S + placement.owner(e)[1] for e in range(N)]
    used = [(r, e, g) for r in range(world) for e, g in enumerate(placement.route_table(r)) if g != first[e]]
    assert used and (world == 2 or any(g // S != r for r, _, g in used)), used


def test_contiguous_placement_is_bit_identical_to_no_placement() -> None:
    """EP 2, fp32, capacity 1.0: ``Placement.contiguous(N, 2)`` and no placement give the same bits."""
    for rank_out in results_for(2):
        res = rank_out["contiguous"]
        assert len(res["none"]) == len(res["contiguous"]) == 2 + 3  # output, input, router, W1, W2 grads
        for a, b in zip(res["none"], res["contiguous"], strict=True):
            assert torch.equal(a, b)


# --- replicas stay identical; checkpoints ------------------------------------------------------------
SYNC_CASE = Case("sync", dict(BASE, capacity_factor=None), [12, 20, 9, 15], seed=41)
SYNC_LAYOUTS = [
    (4, random_placement(N, 4, 2, 7).to_dict()),  # EP 4
    (2, Placement(N, ((0, 1, 2, 3, 4, 6), (4, 5, 6, 7, 0, 1))).to_dict()),  # EP 2 x DP 2
    (2, Placement(N, (tuple(range(N)), tuple(range(N)))).to_dict()),  # EP 2 x DP 2; rank 1 owns no expert
]
SYNC_IDS = ["ep4", "ep2xdp2", "ep2xdp2-all-replicated"]


@pytest.fixture(scope="module")
def sync_results() -> list:
    return [rank_out["sync"] for rank_out in results_for(4)]


@pytest.mark.parametrize("which", [0, 1, 2], ids=SYNC_IDS)
def test_replicas_stay_bitwise_equal_after_sync_and_adamw(sync_results: list, which: int) -> None:
    ep, pdict = SYNC_LAYOUTS[which]
    placement = Placement.from_dict(pdict)
    per_rank = [r[which] for r in sync_results]
    t = make_tensors(SYNC_CASE)
    ref = oracle(SYNC_CASE, t)
    world = len(per_rank)
    for r, got in enumerate(per_rank):
        assert got["slot_experts"] == list(placement.slot_expert_RL[got["ep_rank"]])
        # broadcast_parameters: every replica took its first copy's weights
        assert torch.equal(got["w1_after_broadcast"], t["w1"][got["slot_experts"]]), r
        # the synced grad of every slot: its logical expert's full gradient over the world / world
        for s, e in enumerate(got["slot_experts"]):
            close(got["grad_w1"][s], ref["grad_w1"][e] / world, f"rank {r} slot {s} (expert {e}) W1 grad")
            close(got["grad_w2"][s], ref["grad_w2"][e] / world, f"rank {r} slot {s} (expert {e}) W2 grad")
        close(got["grad_router"], ref["grad_router"] / world, f"rank {r} router grad")
        assert all(s > 0 for s in got["sync_s"]), got["sync_s"]  # seconds, reported per call
    # the grad norm counts each logical expert once per EP group, whichever rank owns it
    want_sq = sum(float((ref[k] / world).square().sum()) for k in ("grad_w1", "grad_w2"))
    for dp in range(world // ep):
        got_sq = sum(got["owned_sq"] for got in per_rank[dp * ep : (dp + 1) * ep])
        assert got_sq == pytest.approx(want_sq, rel=1e-9), (dp, got_sq, want_sq)
    for e in range(N):
        copies = [(got, s) for got in per_rank for s, x in enumerate(got["slot_experts"]) if x == e]
        assert len(copies) == len(placement.replicas(e)) * (world // ep)
        got0, s0 = copies[0]
        for got, s in copies[1:]:
            for key in ("w1", "w2"):
                assert torch.equal(got["slots"][key][s], got0["slots"][key][s0]), (e, key)
            for key in ("exp_avg", "exp_avg_sq"):
                for leaf in (0, 1):
                    assert torch.equal(got["slots"][key][leaf][s], got0["slots"][key][leaf][s0]), (e, key)
        # and the step moved them off their start (the test is not vacuous)
        assert not torch.equal(got0["slots"]["w1"][s0], t["w1"][e])


@pytest.mark.parametrize("which", [0, 1, 2], ids=SYNC_IDS)
def test_checkpoint_writes_each_expert_once_and_reloads_bit_exact(sync_results: list, which: int) -> None:
    ep, pdict = SYNC_LAYOUTS[which]
    placement = Placement.from_dict(pdict)
    per_rank = [r[which] for r in sync_results]
    for got in per_rank:
        assert got["reload_equal"], "weights and AdamW state after loading the per-expert checkpoint"
    for dp in range(len(per_rank) // ep):
        keys = [k for got in per_rank[dp * ep : (dp + 1) * ep] for k in got["written_keys"]]
        assert len(keys) == len(set(keys)), "a replicated expert was written twice"
        assert sorted(keys) == sorted(f"experts.e{e}.{leaf}" for e in range(N) for leaf in ("w1", "w2"))
        for got in per_rank[dp * ep : (dp + 1) * ep]:
            owners = {e for e in range(N) if placement.owner(e)[0] == got["ep_rank"]}
            assert {int(k.split(".")[1][1:]) for k in got["written_keys"]} == owners


def test_deepspeed_refuses_a_replicated_placement_in_one_line(sync_results: list) -> None:
    for got in (r[0] for r in sync_results):
        msg = got["deepspeed"]
        assert msg is not None and "\n" not in msg and "engine=deepspeed" in msg and "replica" in msg, msg
    with pytest.raises(ConfigError, match="engine=deepspeed does not support replicated experts"):
        config_from_dict(tiny(engine="deepspeed", parallel={"ep": 2, "redundant_experts": 1}))


# --- the trainer: replicas in a training run, checkpoint and bit-exact resume ------------------------
def test_training_with_replicas_resumes_bit_exact(tmp_path: Path) -> None:
    """EP 2 with one redundant slot per rank: checkpoints store the placements and each expert once; a run
    resumed from step 2 repeats step 2 of the uninterrupted run exactly (its self-check passes)."""
    from moe_dist.checkpoint.files import load_obj, verify

    train = {"steps": 3, "ckpt_every": 2, "keep_last": 5, "eval_every": 3, "val_sequences": 8}
    cfg = tiny(out_dir=str(tmp_path), name="a", parallel={"ep": 2, "redundant_experts": 1}, train=train)
    run_ranks(train_worker, 2, cfg, timeout=300)
    a = tmp_path / "a"
    ckpt = a / "checkpoints" / "step_00000002"
    manifest = verify(ckpt)
    want = Placement.contiguous(4, 2, 1).to_dict()  # rank 0: experts 0 1 2, rank 1: 2 3 0
    assert manifest["placements"] == {"blocks.0.ffn": want, "blocks.1.ffn": want}
    assert manifest["experts"] == {"experts_ep0.pt": [0, 3], "experts_ep1.pt": [3, 4]}
    assert load_obj(ckpt / "dense.pt")["placements"] == manifest["placements"]
    straggler = [json.loads(x) for x in (a / "straggler.jsonl").read_text().splitlines()]
    assert straggler and all(r["replica_sync_ms"] > 0 for r in straggler), straggler
    e1 = load_obj(ckpt / "experts_ep1.pt")["model"]
    assert sorted(e1) == [f"blocks.{b}.ffn.experts.e3.{leaf}" for b in (0, 1) for leaf in ("w1", "w2")]
    shutil.copytree(a, tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000003")
    run_ranks(train_worker, 2, dict(cfg, name="b"), timeout=300)
    rows = {
        n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in "ab"
    }
    loss = {n: {r["step"]: r["loss"] for r in rows[n] if "loss" in r} for n in "ab"}
    assert sorted(loss["b"]) == [0, 1, 2] and loss["b"][2] == loss["a"][2], loss
    checks = [r for r in rows["b"] if "resume_check" in r]
    assert [c["resume_check"] for c in checks] == ["pass"]


# --- Placement itself ------------------------------------------------------------------------------------
# a hand-made table: N=4 over 3 ranks x 2 slots; global slot g = r*2 + s
#   rank 0: e0 e1 | rank 1: e2 e0 | rank 2: e3 e1
HAND = Placement(4, ((0, 1), (2, 0), (3, 1)))


@pytest.mark.parametrize(
    "rows,match",
    [
        (((0, 1), (1, 2)), r"experts \[3\] have no slot"),
        (((0, 0), (1, 2), (3, 1)), "EP rank 0 holds an expert twice"),
        (((0, 1), (2,), (3, 1)), "same number"),
        (((0, 1), (2, 7)), "outside"),
    ],
)
def test_placement_validation_errors(rows: tuple, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Placement(4, rows)


def test_route_table_prefers_the_local_replica_then_takes_turns() -> None:
    # own replica first (rank 0 for e0, e1; rank 1 for e0; rank 2 for e1), single copies by their slot
    assert HAND.route_table(0) == [0, 1, 2, 4]
    assert HAND.route_table(1) == [3, 1, 2, 4]  # e1: rank 1 is the only non-holder -> first replica (0, 1)
    assert HAND.route_table(2) == [0, 5, 2, 4]  # e0: rank 2 is the only non-holder -> first replica (0, 0)
    # every expert on 2 of 4 ranks: the 2 non-holders take the 2 replicas in turn, by EP rank
    ring = Placement(4, ((0, 1), (1, 2), (2, 3), (3, 0)))
    assert ring.replicas(0) == ((0, 0), (3, 1))
    assert (
        ring.route_table(1)[0] == 0 and ring.route_table(2)[0] == 7
    )  # e0: rank 1 -> (0, 0), rank 2 -> (3, 1)
    assert (
        ring.route_table(0)[2] == 3 and ring.route_table(3)[2] == 4
    )  # e2 on ranks 1, 2: 0 -> (1,1), 3 -> (2,0)


def test_slot_and_rank_loads_by_hand() -> None:
    counts_RN = [[10, 20, 30, 40], [1, 2, 3, 4], [100, 200, 300, 400]]
    # slot 0 (e0): 10 (rank 0) + 100 (rank 2); slot 1 (e1): 20 + 2; slot 2 (e2): 30 + 3 + 300; slot 3 (e0
    # on rank 1): 1; slot 4 (e3): 40 + 4 + 400; slot 5 (e1 on rank 2): 200
    assert HAND.slot_loads(counts_RN) == [110, 22, 333, 1, 444, 200]
    assert HAND.rank_loads(counts_RN) == [132, 334, 644]
    with pytest.raises(ValueError, match=r"\[3, 4\] count matrix"):
        HAND.rank_loads(counts_RN[:2])


def test_contiguous_owners_and_round_trip() -> None:
    p = Placement.contiguous(8, 2, 1)
    assert p.slot_expert_RL == ((0, 1, 2, 3, 4), (4, 5, 6, 7, 0))
    assert p.replicated_experts() == [0, 4] and p.owner(4) == (0, 4) and p.owner(0) == (0, 0)
    assert p.owned_slots(0) == [0, 1, 2, 3, 4] and p.owned_slots(1) == [1, 2, 3]
    assert Placement.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert not Placement.contiguous(8, 2).is_replicated()
    with pytest.raises(ConfigError, match="redundant_experts=5"):
        Placement.contiguous(8, 2, 5)
    with pytest.raises(ConfigError, match="redundant_experts=1"):
        Placement.contiguous(8, 1, 1)


# --- config ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "parallel,match",
    [
        ({"placement": "random"}, "parallel.placement must be contiguous or balanced"),
        ({"ep": 2, "redundant_experts": -1}, "parallel.redundant_experts must be >= 0"),
        (
            {"ep": 2, "redundant_experts": 3},
            r"parallel.redundant_experts=3: needs 0, or EP >= 2 and at most 2",
        ),
        ({"ep": 1, "redundant_experts": 1}, "needs parallel.ep >= 2"),
        ({"ep": 2, "redundant_experts": 1.5}, "redundant_experts"),
        ({"ep": 2, "placement": "balanced"}, "placement=balanced needs parallel.rebalance_every > 0"),
        ({"ep": 2, "rebalance_every": 10}, "rebalance_every=10 needs parallel.placement=balanced"),
        ({"ep": 2, "placement": "balanced", "rebalance_every": -5}, "rebalance_every must be >= 0"),
    ],
)
def test_config_validation(parallel: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config_from_dict(tiny(parallel=parallel))


def test_config_accepts_replicas_and_balanced() -> None:
    cfg = config_from_dict(tiny(parallel={"ep": 2, "redundant_experts": 2}))
    assert cfg.parallel.redundant_experts == 2 and cfg.parallel.placement == "contiguous"
    cfg = config_from_dict(tiny(parallel={"ep": 2, "placement": "balanced", "rebalance_every": 50}))
    assert cfg.parallel.rebalance_every == 50
    cfg.check_world(4)
