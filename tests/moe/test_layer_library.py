"""The layer used as a library (docs/layer.md): the page's script is the one tested.

- Its gradient rule (``sync_gradients``) gives every rank the single-process fp64 oracle's gradients of the
  mean of the ranks' losses, and identical router weights after the step; without the call they differ.
- Its seeding (same seed everywhere) reproduces the single-process layer; ``broadcast_parameters`` repairs
  ranks seeded differently.
- Launched by torchrun, it and a user-style script that ends on a collective exit 0 on every run, without
  calling ``dist.destroy_process_group()`` (the library destroys the groups at exit).
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from moe_dist import MoEConfig, MoELayer
from tests.helpers.asserts import close
from tests.helpers.launch import ROOT, child_env, run_ranks
from tests.helpers.oracle import Case, make_tensors, oracle
from tests.moe.library_workers import (
    EXAMPLE,
    example_worker,
    held_past_destroy_worker,
    replicated_experts_worker,
    teardown_worker,
)

log = logging.getLogger(__name__)
CFG = dict(
    num_experts=8,
    d_model=16,
    d_ff=32,
    top_k=2,
    aux_loss_coef=1e-2,
    z_loss_coef=1e-3,
    cv_importance_coef=1e-2,
)
TOKENS = {2: [24, 40], 4: [20, 33, 16, 28]}
LR = 0.1
EP = 2  # the script's EP size: 2 ranks are EP=2 x DP=1, 4 ranks EP=2 x DP=2
_RESULTS: dict[int, list] = {}


def case(world: int) -> Case:
    return Case(f"library-R{world}", CFG, TOKENS[world], seed=31 + world)


def results(world: int) -> list[dict]:
    if world not in _RESULTS:
        _RESULTS[world] = run_ranks(example_worker, world, case(world), EP, LR, timeout=300)
    return _RESULTS[world]


def test_readme_shows_the_tested_script() -> None:
    """The layer page's 2-rank script (docs/layer.md, which README's "The layer" links to) is
    launch/layer_example.py, character for character."""
    page = (ROOT / "docs" / "layer.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert EXAMPLE.read_text() in blocks


@pytest.mark.parametrize("world", [2, 4])
def test_step_matches_oracle_and_keeps_replicas_equal(world: int) -> None:
    ref = oracle(case(world), make_tensors(case(world)))
    t = make_tensors(case(world))
    res = results(world)
    L = CFG["num_experts"] // EP
    for r, got in enumerate(res):
        e = got["ep_rank"]
        g = got["step"]["grads"]
        # the objective is the mean of the ranks' losses; the oracle's S is their sum
        close(g["router"], ref["grad_router"] / world, f"rank {r} router grad")
        close(g["w1"], ref["grad_w1"][e * L : (e + 1) * L] / world, f"rank {r} expert W1 grad")
        close(g["w2"], ref["grad_w2"][e * L : (e + 1) * L] / world, f"rank {r} expert W2 grad")
        stepped = t["router"] - LR * ref["grad_router"] / world
        close(got["step"]["after"]["router"], stepped, f"rank {r} router after the step")
        assert torch.equal(got["step"]["after"]["router"], res[0]["step"]["after"]["router"]), r
    # the control: the same script without sync_gradients fails both checks
    no_sync = [got["step_no_sync"] for got in res]
    assert not all(torch.equal(s["after"]["router"], no_sync[0]["after"]["router"]) for s in no_sync)
    e0 = res[0]["ep_rank"]
    assert not torch.allclose(no_sync[0]["grads"]["w1"], ref["grad_w1"][e0 * L : (e0 + 1) * L] / world)


@pytest.mark.parametrize("world", [2, 4])
def test_seeding_and_broadcast(world: int) -> None:
    res = results(world)
    torch.manual_seed(0)
    single = MoELayer(MoEConfig(**CFG))  # one process, all experts, the script's seed
    L = CFG["num_experts"] // EP
    for r, got in enumerate(res):
        e = got["ep_rank"]
        alike = got["seeded_alike"]
        assert torch.equal(alike["router"], single.router.weight.detach()), r
        assert torch.equal(alike["w1"], single.experts.w1.detach()[e * L : (e + 1) * L]), r
        assert torch.equal(alike["w2"], single.experts.w2.detach()[e * L : (e + 1) * L]), r
        # seeded by rank: the broadcast gives every rank rank 0's router and every replica its first copy
        by_rank = got["seeded_by_rank"]
        assert torch.equal(by_rank["router"], res[0]["seeded_by_rank"]["router"]), r
        first = res[e]["seeded_by_rank"]  # rank e is the first of the replicas at EP position e
        assert torch.equal(by_rank["w1"], first["w1"]) and torch.equal(by_rank["w2"], first["w2"]), r
    unrepaired = [got["seeded_by_rank_no_broadcast"]["router"] for got in res]
    assert not torch.equal(unrepaired[0], unrepaired[1]), "the control must start from different routers"


def test_replicated_experts_need_the_replica_group() -> None:
    c = Case("replicated", CFG, TOKENS[2], seed=7)
    ref = oracle(c, make_tensors(c))
    res = run_ranks(replicated_experts_worker, 2, c)
    for r, got in enumerate(res):
        assert "expert_dp_group" in got["refused"], got["refused"]
        close(got["router"], ref["grad_router"] / 2, f"rank {r} router grad")
        close(got["w1"], ref["grad_w1"] / 2, f"rank {r} W1 grad")
        close(got["w2"], ref["grad_w2"] / 2, f"rank {r} W2 grad")


def test_exit_hook_registers_once_and_destroys_the_groups() -> None:
    (got,) = run_ranks(teardown_worker, 1, CFG)
    assert got == {"no_group": 0, "with_group": 1, "kept": True, "destroyed": True}


def test_the_layer_holds_no_gloo_group_past_a_destroy() -> None:
    """Destroyed while the layer, its ParallelLayout and a kept output are held, the process groups go at
    once: gloo's worker threads end in ``dist.destroy_process_group()`` (the OS thread count is the same as
    after dropping those objects), not later in the interpreter's finalization, where they can abort it.
    Deterministic; the 20 launches below are the end-to-end check."""
    for got in run_ranks(held_past_destroy_worker, 2, CFG):
        assert got["during"] > got["dropped"], got  # the groups had threads to lose
        assert got["held"] == got["dropped"], got


def test_readme_pattern_with_an_explicit_destroy_exits_zero_20_times() -> None:
    """20 launches of 2 ranks of the README's layer pattern over dist.new_group groups, ending with an
    explicit ``dist.destroy_process_group()`` while the layer, its layout and an output are held: every
    rank exits 0 (none aborts at exit with SIGABRT). Ranks are forked from one process that imported
    torch once (tests/exit_launches.py), 5 launches at a time, so the 40 ranks fit in seconds."""
    p = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "runtime" / "exit_launches.py"), "20", "5", "destroy"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    found = re.search(r"exit statuses: \[([-\d, ]*)\]", p.stdout)
    assert p.returncode == 0 and found, (p.stdout[-2000:], p.stderr[-3000:])
    statuses = [int(s) for s in found.group(1).split(",")]
    assert len(statuses) == 40 and statuses == [0] * 40, (statuses, p.stderr[-3000:])


# The user's report: a script that builds the layer over a 2-rank EP group and ends on a collective,
# without destroy_process_group. Without the exit hook it aborted in 3-6 of 10 torchrun launches there,
# 6 of 20 here.
ENDS_ON_A_COLLECTIVE = textwrap.dedent(
    """
    import torch
    import torch.distributed as dist
    from moe_dist import MoEConfig, MoELayer
    dist.init_process_group("gloo")
    ep_group = dist.new_group([0, 1])
    layer = MoELayer(MoEConfig(d_model=32, d_ff=64, num_experts=4, top_k=2), ep_group=ep_group)
    gathered = [torch.zeros(1) for _ in range(2)]
    dist.all_gather(gathered, torch.ones(1))
    """
)


def _torchrun(script: Path) -> tuple[int, str]:
    env = child_env(CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "localhost:0",  # a free port per launch
        str(script),
    ]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    return p.returncode, p.stdout + p.stderr


def test_scripts_exit_zero_without_destroying_groups(tmp_path: Path) -> None:
    """6 torchrun launches, one at a time: the README script once, the user's script 5 times; every one
    must exit 0.

    The abort is a race. With the exit hook disabled, the user's script aborted in 6 of 20 launches from a
    shell loop and 3 of 24 from subprocess.run on this 2-core machine, so this test catches a lost hook
    often, not always (it passed once with the hook disabled). The deterministic check of the hook itself
    is test_exit_hook_registers_once_and_destroys_the_groups.
    """
    user_script = tmp_path / "ends_on_a_collective.py"
    user_script.write_text(ENDS_ON_A_COLLECTIVE)
    scripts = [EXAMPLE] + [user_script] * 5  # why not more: each launch costs ~6 s of CI on 2 cores
    start = time.monotonic()
    runs = [_torchrun(s) for s in scripts]
    bad = [(s.name, rc, out[-2000:]) for s, (rc, out) in zip(scripts, runs, strict=True) if rc != 0]
    assert not bad, f"{len(bad)} of {len(runs)} launches failed; first: {bad[0]}"
    assert runs[0][1].count("step 2 loss") == 2, "the README script ran its 3 steps"
    log.info("%d launches in %.0f s", len(runs), time.monotonic() - start)
