"""One small metrics sink: TensorBoard scalars plus a JSONL line per record. Only rank 0 holds one.

The one step convention (what ``step`` means; the JSONL formats are unchanged):

- a step's own record carries the **0-based index of that step**, which is also the number of steps
  completed before it: metrics.jsonl step records (``loss``, ...) and skipped steps, straggler.jsonl,
  routing.jsonl, TensorBoard's per-step scalars. Log lines about one step say ``step N: ...`` with the
  same N (the rebalance, the collapse warning, a skipped step, the profiler's summary line).
- what happens **between** steps carries the **number of steps completed**: metrics.jsonl evaluations
  (``val_loss``; ``step`` 0 is the untrained model), ``checkpoint_stall_s`` and ``resume_check`` rows, and
  the checkpoint directories ``step_XXXXXXXX``. Log lines say ``after N steps: ...`` (a checkpoint is still
  named by its directory: ``checkpoint of step N``, ``resumed from ... at step N``).

So the step record with ``step`` N and the evaluation with ``step`` N + 1 describe the same step: the
evaluation follows it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


# The JSONL files a run writes; a checkpoint records their sizes so that a resume can cut replayed rows.
JSONL_FILES = ("metrics.jsonl", "straggler.jsonl", "routing.jsonl")


class _NoEvents:
    """The SummaryWriter calls we make, doing nothing (tensorboard is not installed)."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsLogger:
    """Creates nothing on disk until the first record (a refused launch leaves the run directory alone)."""

    def __init__(self, run_dir: Path, jsonl_name: str = "metrics.jsonl", tb_dir: Path | None = None) -> None:
        self.run_dir, self.default = run_dir, jsonl_name
        self.tb_dir = tb_dir or run_dir / "tb"
        self._files: dict[str, Any] = {}
        self._tb = None
        self._purge_step: int | None = None

    @property
    def tb(self):
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # why: a GPU machine without the tensorboard package must still train
                log.warning("tensorboard is not installed: no events in %s (JSONL is complete)", self.tb_dir)
                self._tb = _NoEvents()
                return self._tb
            # why purge_step: TensorBoard hides the events a crashed attempt wrote past the checkpoint
            self._tb = SummaryWriter(str(self.tb_dir), purge_step=self._purge_step)
        return self._tb

    def sizes(self) -> dict[str, int]:
        """Bytes written so far to each JSONL file (0 for one not written yet)."""
        for f in self._files.values():
            f.flush()
        paths = {n: self.run_dir / n for n in JSONL_FILES}
        return {n: p.stat().st_size if p.exists() else 0 for n, p in paths.items()}

    def resume_at(self, step: int, sizes: dict[str, int] | None) -> None:
        """Cut each JSONL file back to its size at the checkpoint, so replayed steps appear once."""
        self._purge_step = step
        for name in JSONL_FILES if sizes is not None else ():
            path = self.run_dir / name
            if path.exists() and path.stat().st_size > sizes.get(name, 0):
                with open(path, "r+b") as f:
                    f.truncate(sizes.get(name, 0))

    def log(
        self,
        step: int,
        record: dict[str, Any],
        scalars: dict[str, float] | None = None,
        jsonl: str | None = None,
    ) -> None:
        """Write ``record`` to a JSONL file (default metrics.jsonl) and ``scalars`` (default: the record's
        top-level numbers) to TensorBoard."""
        name = jsonl or self.default
        if name not in self._files:
            self._files[name] = open(self.run_dir / name, "a", buffering=1)  # noqa: SIM115 - see close()
        line = {"step": step, **{k: _jsonable(v) for k, v in record.items()}}
        self._files[name].write(json.dumps(line) + "\n")
        if scalars is None:
            scalars = {
                k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)
            }
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


class NullLogger:
    """What ranks other than 0 hold: the same calls, no output."""

    def log(
        self,
        step: int,
        record: dict[str, Any],
        scalars: dict[str, float] | None = None,
        jsonl: str | None = None,
    ) -> None:
        pass

    def close(self) -> None:
        pass

    def sizes(self) -> dict[str, int]:
        return {}

    def resume_at(self, step: int, sizes: dict[str, int] | None) -> None:
        pass
