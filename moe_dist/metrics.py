"""One small metrics sink: TensorBoard scalars plus a JSONL line per record. Only rank 0 holds one."""

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


class MetricsLogger:
    def __init__(self, run_dir: Path, jsonl_name: str = "metrics.jsonl", tb_dir: Path | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir, self.default = run_dir, jsonl_name
        self._files: dict[str, Any] = {}
        self.tb = SummaryWriter(str(tb_dir or run_dir / "tb"))

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
        self.tb.flush()
        self.tb.close()


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
