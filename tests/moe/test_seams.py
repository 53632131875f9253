"""The extension seams: a dispatcher chosen by name, a balancing term in one place, the packer's layout."""

from __future__ import annotations

import pytest
import torch

import moe_dist.moe.balance as balance
from moe_dist import ConfigError, MoEConfig, MoELayer, Placement
from moe_dist.moe.dispatcher import LocalDispatcher, register_dispatcher
from moe_dist.moe.packing import GRAD, HOST, PLAIN, Block, Packing

SMALL = dict(num_experts=8, d_model=16, d_ff=32, top_k=2)


def _run(layer: MoELayer, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(3, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x.requires_grad_(True)
    out = layer(x)
    (out.hidden.square().mean() + out.aux_loss).backward()
    return out.hidden.detach(), out.aux_loss.detach(), x.grad


class CountingDispatcher(LocalDispatcher):
    """The local dispatcher, counting its calls and the placements it is handed."""

    calls = 0
    placements: list[Placement] = []

    def dispatch(self, x_TD, plan, counts_RN=None):
        type(self).calls += 1
        return super().dispatch(x_TD, plan, counts_RN)

    def set_placement(self, placement: Placement) -> None:
        type(self).placements.append(placement)
        super().set_placement(placement)


def test_a_registered_dispatcher_is_built_by_name() -> None:
    register_dispatcher("counting_test", CountingDispatcher)
    cfg = MoEConfig(**SMALL)
    torch.manual_seed(0)
    ref = MoELayer(cfg).double()
    torch.manual_seed(0)
    layer = MoELayer(cfg, dispatcher="counting_test").double()
    assert isinstance(layer.dispatcher, CountingDispatcher)
    got, want = _run(layer), _run(ref)
    assert CountingDispatcher.calls == 1
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    new = Placement(8, (tuple(reversed(range(8))),), version=1)
    layer.set_placement(new)
    assert CountingDispatcher.placements[-1] is new


def test_an_unknown_dispatcher_is_one_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown dispatcher 'nope'; known: .*all_to_all.*local"):
        MoELayer(MoEConfig(**SMALL), dispatcher="nope")


def test_the_packer_lays_out_bands_and_reads_by_name() -> None:
    blocks = [
        Block("flag", torch.tensor([1.0]), HOST),
        Block("counts", torch.tensor([3, 4], dtype=torch.int64), PLAIN),
        Block("sum", torch.tensor([0.5, 1.5, 2.5]), GRAD),
        Block("block", torch.arange(4.0).view(2, 2), HOST),
    ]
    packing = Packing(blocks)
    vec = packing.pack()
    # grad band first, then plain, then host, each in declaration order
    assert vec.dtype == torch.float64
    assert vec.tolist() == [0.5, 1.5, 2.5, 3.0, 4.0, 1.0, 0.0, 1.0, 2.0, 3.0]
    view = packing.view(vec)
    assert view["flag"].dim() == 0 and float(view["flag"]) == 1.0
    assert view["counts"].tolist() == [3.0, 4.0]
    host = view.host()
    assert len(host.values) == 5  # the host band alone crosses to the host
    assert host["block"] == [0.0, 1.0, 2.0, 3.0] and host["flag"] == [1.0]
    with pytest.raises(ValueError, match="declared twice"):
        Packing([Block("a", torch.zeros(1)), Block("a", torch.zeros(2), GRAD)])


class MeanSquareScores(balance.BalanceTerm):
    """A toy term: coef * mean over the balance group's tokens of sum_i s_{i,t}^2, with a gradient."""

    name = "toy"

    def blocks(self, c):
        return [Block("toy_sum", (c.route.scores_TN**2).sum().reshape(1), GRAD)]

    def loss(self, c, scoped, glob):
        return 0.5 * scoped["toy_sum"].to(c.dtype) / scoped["tokens"].clamp(min=1).to(c.dtype)


def test_a_new_balancing_term_is_one_class(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = MoEConfig(**SMALL, z_loss_coef=1e-3, seq_aux_loss_coef=1e-2)
    torch.manual_seed(1)
    ref = MoELayer(cfg).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    want = ref(x)
    monkeypatch.setattr(balance, "BALANCE_TERMS", [*balance.BALANCE_TERMS, MeanSquareScores()])
    got = ref(x)
    scores_TN = ref.router(x.reshape(-1, 16)).scores_TN
    assert torch.allclose(got.terms["toy"], 0.5 * (scores_TN**2).sum(-1).mean(), rtol=1e-12, atol=0)
    for name, value in want.terms.items():  # the other terms read their blocks where they are now
        assert torch.equal(got.terms[name], value), name
    assert torch.equal(got.aux_loss, want.aux_loss + got.terms["toy"])
