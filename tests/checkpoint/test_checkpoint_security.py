"""Loading a checkpoint never runs code from it: every checkpoint file is read with torch's weights-only
unpickler (plus a scoped allowlist of DeepSpeed's optimizer-state types), under both engines."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from moe_dist.checkpoint.files import CheckpointError, UnsafeCheckpointError, load_obj
from tests.helpers.launch import run_ranks
from tests.helpers.shared_runs import (
    RESUMED_FROM,
    AuditedRun,
    SharedRun,
    ep2_config,
    launch_deepspeed,
    write_ds_config,
)
from tests.training.train_workers import train_worker

SYSTEM = f"{os.system.__module__}.system"  # how the pickle names os.system: posix.system on Linux


class _Payload:
    """Unpickling this runs ``touch marker``: what a hostile checkpoint does under a plain unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@dataclass
class _Harmless:
    value: int


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _craft(shard: Path, marker: Path, allowed: list | None = None) -> None:
    """Rewrite ``shard`` as its own state plus a payload, and give the manifest the new file's sha256 and
    size: the checksum check passes, so only the unpickler stands between the payload and a shell."""
    state = load_obj(shard, allowed or [])
    state["initial_val_loss"] = _Payload(marker)
    torch.save(state, shard)
    mpath = shard.parent / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["files"][shard.name] = {"sha256": _sha256(shard), "bytes": shard.stat().st_size}
    mpath.write_text(json.dumps(manifest, indent=1))


def _snapshot(run: Path) -> dict[str, tuple[int, str]]:
    """Every file and directory under ``run``: mtime (ns) and content hash (directories: 'dir')."""
    return {
        str(p.relative_to(run)): (p.stat().st_mtime_ns, _sha256(p) if p.is_file() else "dir")
        for p in sorted(run.rglob("*"))
    }


def test_load_obj_refuses_a_live_payload_and_scopes_its_allowlist(tmp_path: Path) -> None:
    """The payload really runs under ``weights_only=False`` (the old loader); load_obj refuses it with one
    line naming the file and the global, runs nothing, and its allowlist does not outlive the call."""
    live = tmp_path / "live.pt"
    torch.save({"w": torch.ones(2), "x": _Payload(tmp_path / "ran")}, live)
    torch.load(live, weights_only=False)
    assert (tmp_path / "ran").exists(), "the payload is not live: this test would prove nothing"

    bad = tmp_path / "bad.pt"
    torch.save({"w": torch.ones(2), "x": [_Payload(tmp_path / "marker")]}, bad)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_obj(bad)
    msg = str(info.value)
    assert "\n" not in msg and f"refused checkpoint file {bad}: it holds {SYSTEM}," in msg
    assert not (tmp_path / "marker").exists()

    # why sets: torch keeps the allowlist in a set, and a scoped add and remove may list it in another order
    before = set(torch.serialization.get_safe_globals())
    obj = tmp_path / "obj.pt"
    torch.save({"h": _Harmless(3)}, obj)
    assert load_obj(obj, [_Harmless]) == {"h": _Harmless(3)}
    assert set(torch.serialization.get_safe_globals()) == before
    with pytest.raises(UnsafeCheckpointError, match=f"it holds {__name__}._Harmless,"):
        load_obj(obj)  # the allowlist was for that call only

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError, match=f"checkpoint file {junk} cannot be read"):
        load_obj(junk)


def _payload_worker(rank: int, world: int, marker: str) -> _Payload:
    return _Payload(Path(marker))


def test_spawn_refuses_a_result_that_would_run_code(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=f"rank 0 returned more than .*{SYSTEM}"):
        run_ranks(_payload_worker, 1, str(tmp_path / "marker"), timeout=120)
    assert not (tmp_path / "marker").exists()


def test_torch_engine_resume_refuses_a_crafted_shard(torch_ep2_run: SharedRun, tmp_path: Path) -> None:
    """rank1.pt of the newest checkpoint carries a payload and a matching manifest: both ranks raise
    UnsafeCheckpointError naming that file and posix.system, nothing runs, the run directory is as it was
    (config.yaml included: the resumed config differs, so a rewrite would show), and no older checkpoint
    is used instead. The run is a copy of the session's shared torch-engine run cut back to step 2."""
    run, marker = torch_ep2_run.copy(tmp_path / "a", until=2), tmp_path / "marker"
    shard = run / "checkpoints" / "step_00000002" / "rank1.pt"
    _craft(shard, marker)
    before = _snapshot(run)
    res = run_ranks(train_worker, 2, ep2_config(tmp_path, train={"steps": 4}), expect_errors=True)
    for status, msg in res:
        assert status == "error", msg
        first = msg.splitlines()[0]
        assert first.startswith(f"UnsafeCheckpointError: refused checkpoint file {shard}: it holds {SYSTEM},")
    assert not marker.exists()
    assert _snapshot(run) == before


def test_deepspeed_resume_loads_weights_only_and_refuses_a_crafted_shard(
    ds_zero2_resumed: AuditedRun, ds_zero2_run: SharedRun, tmp_path: Path
) -> None:
    """engine=deepspeed, ZeRO-2 (its optimizer state holds DeepSpeed objects). A normal resume succeeds
    with every torch.load in every process made with weights_only=True (DeepSpeed's own checkpoint engine,
    which unpickles everything, is never used). A crafted rank1.pt is refused on both ranks, runs nothing,
    and leaves the run directory as it was.

    The normal resume is the session's shared one (tests/shared_runs.py: the shared ZeRO-2 run cut back to
    step 3 and resumed with every torch.load logged); the crafted shard is in a copy of the shared run cut
    back to step 2, launched with train.steps=3."""
    from moe_dist.training.deepspeed_engine import checkpoint_globals

    stderr = ds_zero2_resumed.stderr
    assert "resumed from" in stderr and f"at step {RESUMED_FROM}" in stderr, stderr[-3000:]
    loads = ds_zero2_resumed.loads
    assert len(loads) == 6, loads  # dense, experts and rank file on each of 2 ranks
    assert all(line.endswith("weights_only=True") for line in loads), loads

    run, marker = ds_zero2_run.copy(tmp_path / "a", until=2), tmp_path / "marker"
    cfg = write_ds_config(tmp_path, steps=3)
    shard = run / "checkpoints" / "step_00000002" / "rank1.pt"
    _craft(shard, marker, checkpoint_globals())
    before = _snapshot(run)
    p = launch_deepspeed(cfg, "a")
    assert p.returncode != 0
    out = p.stdout + p.stderr
    line = f"UnsafeCheckpointError: refused checkpoint file {shard}: it holds {SYSTEM},"
    assert out.count(line) >= 2, out[-5000:]  # rank 0 names rank 1's file too, instead of timing out
    assert not marker.exists()
    assert _snapshot(run) == before
