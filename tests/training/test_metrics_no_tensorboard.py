"""Issue 26's GPU machine has no tensorboard package: the metrics sink must still write every JSONL row."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from moe_dist.training.metrics import MetricsLogger


def test_metrics_without_tensorboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With ``torch.utils.tensorboard`` unimportable, log() writes its JSONL rows and warns once."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # any import of it raises ImportError
    metrics = MetricsLogger(tmp_path)
    with caplog.at_level(logging.WARNING, logger="moe_dist.training.metrics"):
        metrics.log(0, {"loss": 5.5})
        metrics.log(1, {"loss": 5.25})
    metrics.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 0, "loss": 5.5}, {"step": 1, "loss": 5.25}]
    assert sum("tensorboard is not installed" in r.message for r in caplog.records) == 1
    assert not (tmp_path / "tb").exists()
