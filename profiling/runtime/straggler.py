"""The trainer's profiler session: straggler timers, the per-step gather to rank 0, the derived records
(``straggler.jsonl``, TensorBoard ``straggler/...`` and ``load/...``), the console summary, and the
torch.profiler traces (one file per rank per window, in the run's ``tb/``, named ``<host>_<rank>``).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from profiling.runtime.analysis import StragglerAnalyzer, scalars, summary_line
from profiling.runtime.quiet import without_kineto_markers
from profiling.runtime.record import StepExtras, WireCount
from profiling.runtime.timer import Injection, StragglerTimer

log = logging.getLogger("moe_dist.profile")


class StragglerProfiler:
    def __init__(
        self,
        cfg,
        rank: int,
        world: int,
        ep: int,
        device: torch.device,
        run_dir: Path,
        metrics,
        moe_layer_ids: list[int],
    ) -> None:
        p = cfg.profile
        self.rank, self.world, self.device, self.metrics = rank, world, device, metrics
        self.log_every = cfg.train.log_every
        self.timer: StragglerTimer | None = None
        if p.enabled and ep > 1:
            inj = Injection(p.inject_delay_ms, p.inject_layer, p.inject_rank, p.inject_where)
            self.timer = StragglerTimer(moe_layer_ids, rank, device, inj)
        elif p.enabled and rank == 0:
            log.info("straggler timers are off: they need parallel.ep > 1 (no all-to-all with ep=1)")
        self.analyzer = StragglerAnalyzer(moe_layer_ids, world) if rank == 0 else None
        self.recent: list[dict] = []
        self.prof = None
        self._trace_cfg = p if p.trace else None
        self._trace_dir = run_dir / "tb"

    def start(self) -> None:
        """Start the torch.profiler schedule (creates the trace directory): only once the run starts."""
        p = self._trace_cfg
        if p is None or self.prof is not None:
            return
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(
            activities=acts,
            schedule=torch.profiler.schedule(wait=p.wait, warmup=p.warmup, active=p.active, repeat=p.repeat),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(
                str(self._trace_dir), worker_name=f"{socket.gethostname()}_{self.rank}"
            ),
        )
        with without_kineto_markers():
            self.prof.start()

    @property
    def hook(self) -> StragglerTimer | None:
        return self.timer

    def pause(self, paused: bool) -> None:
        """Evaluation steps are not timed."""
        if self.timer is not None:
            self.timer.enabled = not paused

    def step_end(self, step: int, step_s: float, extra: StepExtras | None = None) -> dict | None:
        if self.prof is not None:
            with without_kineto_markers():  # the schedule starts and stops kineto inside step()
                self.prof.step()
        if self.timer is None:
            return None
        data = self.timer.collect().to(self.device)
        wire = extra.wire if extra is not None else None
        if wire is not None and len(wire.bytes) == data.shape[0]:
            # why two columns of the same gather: every rank's measured wire counts reach rank 0 without
            # another collective (fp64 holds byte counts exactly below 2^53)
            cols = torch.tensor([wire.rows, wire.bytes], dtype=torch.float64, device=data.device).t()
            data = torch.cat([data, cols], 1)
        else:
            wire = None
        gathered = [torch.empty_like(data) for _ in range(self.world)] if self.rank == 0 else None
        if self.world > 1:
            dist.gather(data, gathered, dst=0)  # one small tensor per rank, once per step
        else:
            gathered = [data]
        if self.rank != 0:
            return None
        data_RMX = torch.stack(gathered).cpu()
        if wire is not None and extra is not None:  # the step's wire, summed over ranks, per layer
            rows_M, bytes_M = data_RMX[:, :, -2:].sum(0).round().to(torch.int64).t().tolist()
            extra = dataclasses.replace(extra, wire=WireCount(rows_M, bytes_M))
            data_RMX = data_RMX[:, :, :-2]
        rec = self.analyzer.update(step, step_s * 1e3, data_RMX)
        if extra is not None:
            rec.update(extra.to_jsonl())
        self.metrics.log(step, rec, scalars(rec), jsonl="straggler.jsonl")
        self.recent.append(rec)
        if len(self.recent) >= self.log_every:
            log.info("step %d: %s", step, summary_line(self.recent))
            self.recent = []
        return rec

    def close(self) -> None:
        if self.prof is not None:
            with without_kineto_markers():
                self.prof.stop()
