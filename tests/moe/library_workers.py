"""Rank-side bodies for tests/test_layer_library.py: the README's script (``launch/layer_example.py``),
imported and driven with the oracle's fp64 weights and tokens."""

from __future__ import annotations

import atexit
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist

from moe_dist import ConfigError, MoEConfig, MoELayer, ParallelLayout, sync_gradients
from moe_dist.runtime import teardown
from tests.helpers.oracle import Case, make_tensors

EXAMPLE = Path(__file__).resolve().parents[2] / "launch" / "layer_example.py"
CPU = torch.device("cpu")


def load_example() -> ModuleType:
    """A fresh copy of the README script as a module (its ``main()`` does not run)."""
    spec = importlib.util.spec_from_file_location("layer_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps the gradients it stepped with (the script zeroes them right after the step)."""

    def step(self, closure=None):
        self.stepped_with = {id(p): p.grad.clone() for g in self.param_groups for p in g["params"]}
        return super().step(closure)


def _weights(layer: MoELayer) -> dict[str, torch.Tensor]:
    return {
        "router": layer.router.weight.detach().clone(),
        "w1": layer.experts.w1.detach().clone(),
        "w2": layer.experts.w2.detach().clone(),
    }


def _oracle_step(ex: ModuleType, case: Case, layout: ParallelLayout, lr: float) -> dict:
    """The script's build_layer + optimizer_step on the oracle's weights and this rank's tokens (fp64)."""
    t = make_tensors(case)
    cfg = MoEConfig(**case.cfg)
    layer = ex.build_layer(cfg, layout, CPU).double()
    L, e = cfg.num_experts // layout.ep, layout.ep_rank
    with torch.no_grad():
        layer.router.weight.copy_(t["router"])
        layer.experts.w1.copy_(t["w1"][e * L : (e + 1) * L])
        layer.experts.w2.copy_(t["w2"][e * L : (e + 1) * L])
    optimizer = RecordingSGD(layer.parameters(), lr=lr)
    out = layer(t["xs"][layout.rank])
    loss = (out.hidden * t["cot"][layout.rank]).sum() + out.aux_loss
    ex.optimizer_step(layer, optimizer, loss, layout)
    seen = optimizer.stepped_with
    grads = {
        "router": seen[id(layer.router.weight)],
        "w1": seen[id(layer.experts.w1)],
        "w2": seen[id(layer.experts.w2)],
    }
    return {"grads": grads, "after": _weights(layer)}


def example_worker(rank: int, world: int, case: Case, ep: int, lr: float) -> dict:
    """Everything one rank reports about the README script: its initialisation under alike and unlike
    seeds, and one optimizer step with and without the gradient sync (the control)."""
    layout = ParallelLayout.build(ep)
    res: dict = {"ep_rank": layout.ep_rank}
    ex = load_example()
    res["seeded_alike"] = _weights(ex.build_layer(MoEConfig(**case.cfg), layout, CPU, seed=0))
    res["seeded_by_rank"] = _weights(ex.build_layer(MoEConfig(**case.cfg), layout, CPU, seed=rank))
    res["step"] = _oracle_step(ex, case, layout, lr)

    control = load_example()
    control.broadcast_parameters = lambda *args, **kwargs: None
    res["seeded_by_rank_no_broadcast"] = _weights(
        control.build_layer(MoEConfig(**case.cfg), layout, CPU, seed=rank)
    )
    control.sync_gradients = lambda *args, **kwargs: None
    res["step_no_sync"] = _oracle_step(control, case, layout, lr)
    return res


def replicated_experts_worker(rank: int, world: int, case: Case) -> dict:
    """A layer with every expert on every rank (no EP group): sync_gradients refuses to run without the
    replica group, and with it (the world) the expert grads are the mean over ranks."""
    t = make_tensors(case)
    layer = MoELayer(MoEConfig(**case.cfg), ep_group=None, balance_group=dist.group.WORLD).double()
    with torch.no_grad():
        layer.router.weight.copy_(t["router"])
        layer.experts.w1.copy_(t["w1"])
        layer.experts.w2.copy_(t["w2"])
    out = layer(t["xs"][rank])
    ((out.hidden * t["cot"][rank]).sum() + out.aux_loss).backward()
    try:
        sync_gradients(layer, dist.group.WORLD, None)
        refused = ""
    except ConfigError as e:
        refused = str(e)
    sync_gradients(layer, dist.group.WORLD, dist.group.WORLD)
    return {
        "refused": refused,
        "router": layer.router.weight.grad.clone(),
        "w1": layer.experts.w1.grad.clone(),
        "w2": layer.experts.w2.grad.clone(),
    }


def teardown_worker(rank: int, world: int, cfg: dict) -> dict:
    """The exit hook: registered once by the first layer built over a group, it destroys the groups,
    and it stands aside while an uncaught exception is on record."""
    before = atexit._ncallbacks()
    MoELayer(MoEConfig(**cfg))  # no group: no collectives, no hook
    no_group = atexit._ncallbacks() - before
    MoELayer(MoEConfig(**cfg), balance_group=dist.group.WORLD)
    MoELayer(MoEConfig(**cfg), balance_group=dist.group.WORLD)
    with_group = atexit._ncallbacks() - before
    sys.last_value = RuntimeError("an uncaught exception")
    try:
        teardown._destroy_at_exit()
        kept = dist.is_initialized()
    finally:
        del sys.last_value
    teardown._destroy_at_exit()
    destroyed = not dist.is_initialized()
    return {"no_group": no_group, "with_group": with_group, "kept": kept, "destroyed": destroyed}


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def held_past_destroy_worker(rank: int, world: int, cfg: dict) -> dict:
    """The README's pattern over ParallelLayout's dist.new_group groups, destroyed while the layer, its
    layout and a kept output (with its graph) are still held: the OS threads left then, and after those are
    dropped too. Equal counts: the layer held none of gloo's threads (groups) past the destroy."""
    import gc

    from moe_dist import ParallelLayout

    layout = ParallelLayout.build(ep=2)
    layer = MoELayer(MoEConfig(**cfg), ep_group=layout.ep_group, balance_group=layout.balance_group)
    x = torch.randn(16, cfg["d_model"])
    out = layer(x)
    (out.hidden.sum() + out.aux_loss).backward()
    out = layer(x)  # kept, with its graph (the all-to-all nodes)
    during = _os_threads()
    dist.destroy_process_group()
    gc.collect()
    held = _os_threads()
    del layer, layout, out
    gc.collect()
    return {"during": during, "held": held, "dropped": _os_threads()}
