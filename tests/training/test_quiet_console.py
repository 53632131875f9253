"""A quiet console under DeepSpeed: the deprecation warning torch raises for DeepSpeed's own calls (two lines
per rank, one a stray ``return func(*args, **kwargs)``) and its "Setting accelerator to CPU" line are gone,
while every other warning still shows."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from moe_dist.training.deepspeed_engine import quiet_deepspeed
from tests.helpers.shared_runs import SharedRun

DEPRECATION = (
    "`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
    "`torch.distributed.all_gather_single` instead."
)


def test_quiet_deepspeed_drops_only_the_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_deepspeed(torch.device("cpu"))
        warnings.warn(DEPRECATION, FutureWarning, stacklevel=1)
        warnings.warn("`torch.foo` is deprecated", FutureWarning, stacklevel=1)
        warnings.warn("a real problem", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["`torch.foo` is deprecated", "a real problem"]
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")  # a user's choice is kept
    with warnings.catch_warnings():
        quiet_deepspeed(torch.device("cpu"))
    assert os.environ["DS_ACCELERATOR"] == "xpu"


def test_deepspeed_launch_console_is_quiet(ds_zero2_run: SharedRun) -> None:
    """The session's shared ZeRO-2 launch (tests/helpers/shared_runs.py): its ranks' stderr."""
    err = ds_zero2_run.stderr
    assert "all_gather_into_tensor` is deprecated" not in err, err[-2000:]
    assert "return func(*args, **kwargs)" not in err, err[-2000:]
    assert "moe_dist.train INFO: checkpoint" in err  # the launch's stderr was captured at all
