"""The straggler timer: implements ``moe_dist.moe.timing.TimingHook`` for the expert-parallel layers.

Per step, MoE layer and rank it accumulates (over micro-batches):

    E_fwd  expert compute between the end of the dispatch all-to-all and the start of the combine one
    E_bwd  the mirror image in backward (combine all-to-all backward done -> dispatch backward starts)
    A_dis  forward dispatch all-to-all duration (count exchange included; under moe.overlap_shared the
           launch plus the wait after the shared experts, not the shared experts in between)
    A_com  forward combine all-to-all duration
    n      (token, expert) rows received by this rank's experts

CPU: ``time.perf_counter``. CUDA: events recorded on the current stream, read back once at step end
(``collect``), so the hot path never synchronises the host.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

FIELDS = ("E_fwd", "E_bwd", "A_dis", "A_com", "n")
_SPANS = {  # field: ((phase, start event, end event), ...), summed
    "E_fwd": (("fwd", "experts_start", "experts_end"),),
    "E_bwd": (("bwd", "experts_start", "experts_end"),),
    # why two spans: under moe.overlap_shared the all-to-all is launched (first span) and waited for after
    # the shared experts (second span); the shared experts between them are in neither
    "A_dis": (("fwd", "dispatch_start", "dispatch_end"), ("fwd", "dispatch_wait", "dispatch_ready")),
    "A_com": (("fwd", "combine_start", "combine_end"),),
}


@dataclass
class Injection:
    """A known delay for validating the profiler: ``delay_ms`` on ``rank`` in MoE layer ``layer``,
    inside the expert stage ("experts") or just before the dispatch all-to-all ("before_dispatch")."""

    delay_ms: float = 0.0
    layer: int = 0
    rank: int = 0
    where: str = "experts"


_CLOCK_HZ: dict[int, float] = {}


def cuda_clock_hz(device: torch.device) -> float:
    """Cycles per second of ``torch.cuda._sleep`` on this device, measured once with CUDA events (the best
    of three 10M-cycle spins).

    why measured: the spin counts clock cycles, and GPU clocks differ (about 1.4 GHz to 2 GHz), so a fixed
    rate would make an injected delay 30% short on one GPU and long on another.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CLOCK_HZ:
        cycles, rates = 10_000_000, []
        with torch.cuda.device(index):
            torch.cuda._sleep(1000)  # the kernel's first launch is not timed
            for _ in range(3):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                torch.cuda._sleep(cycles)
                end.record()
                end.synchronize()
                rates.append(cycles / (start.elapsed_time(end) / 1e3))
        _CLOCK_HZ[index] = max(rates)  # another process sharing the GPU can only slow a spin down
    return _CLOCK_HZ[index]


def _sleep(seconds: float, device: torch.device) -> None:
    if device.type == "cuda":
        # why: a host sleep would not delay the GPU stream; spin the device for about that long
        torch.cuda._sleep(int(seconds * cuda_clock_hz(device)))
    else:
        time.sleep(seconds)


class StragglerTimer:
    def __init__(
        self, layers: list[int], rank: int, device: torch.device, injection: Injection | None = None
    ) -> None:
        self.layers = layers
        self.index = {layer: i for i, layer in enumerate(layers)}
        self.rank, self.device = rank, device
        self.injection = injection if injection and injection.delay_ms > 0 else None
        if self.injection is not None and device.type == "cuda":
            cuda_clock_hz(device)  # measured now, at set-up, not inside a timed step
        self.cuda = device.type == "cuda"
        self._marks: dict[tuple[int, str, str], list] = defaultdict(list)
        self._tokens = [0] * len(layers)
        self.enabled = True

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    # --- TimingHook ----------------------------------------------------------------------------
    def record(self, layer: int, phase: str, event: str) -> None:
        if not self.enabled:
            return
        inj = self.injection
        if (
            inj is not None
            and inj.where == "before_dispatch"
            and event == "dispatch_start"
            and phase == "fwd"
            and layer == inj.layer
            and self.rank == inj.rank
        ):
            _sleep(inj.delay_ms / 1e3, self.device)
        self._marks[(layer, phase, event)].append(self._now())

    def tokens(self, layer: int, n: int) -> None:
        if self.enabled:
            self._tokens[self.index[layer]] += n

    def expert_delay(self, layer: int) -> None:
        inj = self.injection
        if (
            self.enabled
            and inj is not None
            and inj.where == "experts"
            and layer == inj.layer
            and self.rank == inj.rank
        ):
            _sleep(inj.delay_ms / 1e3, self.device)

    # --- step end ------------------------------------------------------------------------------
    def collect(self) -> Tensor:
        """This rank's [layers, FIELDS] float64 tensor for the step (ms; n as a count), then reset."""
        if self.cuda:
            torch.cuda.synchronize(self.device)  # the one read-back per step
        out = torch.zeros(len(self.layers), len(FIELDS), dtype=torch.float64)
        for li, layer in enumerate(self.layers):
            for fi, name in enumerate(FIELDS[:-1]):
                for phase, start, end in _SPANS[name]:
                    starts, ends = (
                        self._marks.get((layer, phase, start), []),
                        self._marks.get((layer, phase, end), []),
                    )
                    out[li, fi] += sum(self._elapsed_ms(a, b) for a, b in zip(starts, ends, strict=False))
            out[li, -1] = self._tokens[li]
        self._marks.clear()
        self._tokens = [0] * len(self.layers)
        return out

    def _elapsed_ms(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b)
        return (b - a) * 1e3

    def discard(self) -> None:
        """Drop what was recorded (e.g. during evaluation)."""
        self._marks.clear()
        self._tokens = [0] * len(self.layers)
