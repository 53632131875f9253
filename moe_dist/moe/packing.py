"""The balancing all-reduce's layout: named blocks, the offsets the packer assigns them, views by name.

``moe_dist.moe.balance`` declares every term's blocks; nothing else knows an offset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

GRAD, PLAIN, HOST = "grad", "plain", "host"
"""Bands of the packed vector, laid out in this order. GRAD blocks carry a gradient (the backward of the
all-reduce multiplies by R without communicating); PLAIN blocks are statistics without one; HOST blocks are
read back to the host too, in ONE ``tolist`` of the vector's tail, so the host never copies the rest."""


@dataclass(frozen=True)
class Block:
    """One named block of the balancing all-reduce: this rank's values and the band it travels in."""

    name: str
    local: Tensor
    """This rank's contribution (any shape; it travels flattened, as float64)."""
    band: str = PLAIN


class Packing:
    """Offsets of every block in the one all-reduce per layer, assigned here and nowhere else.

    Blocks go GRAD, then PLAIN, then HOST, each band in the order the terms declare them. A block of one
    element is read back as a 0-d tensor.
    """

    def __init__(self, blocks: list[Block]) -> None:
        names = [b.name for b in blocks]
        if len(set(names)) != len(names):
            raise ValueError(
                f"balancing blocks declared twice: {sorted(n for n in names if names.count(n) > 1)}"
            )
        self.blocks = [b for band in (GRAD, PLAIN, HOST) for b in blocks if b.band == band]
        self.span: dict[str, tuple[int, int]] = {}
        off = 0
        for b in self.blocks:
            self.span[b.name] = (off, b.local.numel())
            off += b.local.numel()
        self.host_start = off - sum(b.local.numel() for b in self.blocks if b.band == HOST)
        self.band = {b.name: b.band for b in self.blocks}

    def pack(self) -> Tensor:
        # why float64: counts stay exact integers (to 2^53) in any summation order; bf16 ones flip bias signs
        return torch.cat([b.local.reshape(-1).to(torch.float64) for b in self.blocks])

    def view(self, vec: Tensor) -> View:
        return View(self, vec)


class View:
    """The blocks of one packed vector (this rank's, or the group's sum) by name."""

    def __init__(self, packing: Packing, vec: Tensor) -> None:
        self.packing, self.vec = packing, vec
        self._cache: dict[str, Tensor] = {}

    def derived(self, key: str, make: Callable[[], Tensor]) -> Tensor:
        """``make()`` once per view: why: a value two terms share (P) must be one node of the graph, so its
        gradients add up before they flow back, in the same order as ever."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def __contains__(self, name: str) -> bool:
        return name in self.packing.span

    def __getitem__(self, name: str) -> Tensor:
        off, n = self.packing.span[name]
        # PLAIN and HOST blocks carry no gradient
        vec = self.vec if self.packing.band[name] == GRAD else self.vec.detach()
        return vec[off] if n == 1 else vec[off : off + n]

    def host(self) -> HostView:
        """One read-back of the HOST band (nothing else of the vector crosses to the host)."""
        start = self.packing.host_start
        return HostView(self.packing, start, self.vec[start:].detach().tolist())


class HostView:
    def __init__(self, packing: Packing, start: int, values: list[float]) -> None:
        self.packing, self.start, self.values = packing, start, values

    def __getitem__(self, name: str) -> list[float]:
        off, n = self.packing.span[name]
        return self.values[off - self.start : off - self.start + n]
