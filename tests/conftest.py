"""Session fixtures: finished runs that several test files share (see tests/shared_runs.py). Each is made
on first use, so a test run alone still gets it; each must be unchanged at the end of the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.shared_runs import AuditedRun, SharedRun, ds_resumed, ds_run, torch_run


@pytest.fixture(scope="session")
def torch_ep2_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedRun]:
    """engine=torch, EP=2 on 2 ranks, 6 steps with a checkpoint after each (``shared_runs.ep2_config``)."""
    run = torch_run(tmp_path_factory.mktemp("torch_ep2"))
    yield run
    run.check_unchanged()


@pytest.fixture(scope="session")
def ds_zero2_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedRun]:
    """The same run under the deepspeed launcher with engine=deepspeed, ZeRO-2."""
    pytest.importorskip("deepspeed")
    run = ds_run(tmp_path_factory.mktemp("ds_zero2"))
    yield run
    run.check_unchanged()


@pytest.fixture(scope="session")
def ds_zero2_resumed(
    ds_zero2_run: SharedRun, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AuditedRun]:
    """ds_zero2_run cut back to step 3 and resumed to step 6 (its metrics.jsonl emptied first), with every
    torch.load of the launch logged."""
    run = ds_resumed(ds_zero2_run, tmp_path_factory.mktemp("ds_zero2_resumed"))
    yield run
    run.check_unchanged()
