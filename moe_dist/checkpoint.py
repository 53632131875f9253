"""Sharded, atomic checkpoints with a checksummed manifest.

Layout of ``checkpoints/``::

    step_00000100/dense.pt          rank 0: replicated params and buffers (incl. expert biases)
    step_00000100/experts_ep{e}.pt  the first replica of EP rank e: that rank's expert params
    step_00000100/rank{r}.pt        every rank: optimizer + scheduler state, RNG states, step
    step_00000100/manifest.json     sha256 and size of every file, world, ep, step
    latest                          name of the newest complete checkpoint

Every file is plain data: tensors, numbers, strings, None and containers, plus (rank files of
``engine: deepspeed``) the few DeepSpeed types its ZeRO optimizer state holds. Files are read with torch's
weights-only unpickler, so loading a checkpoint never runs code from it; anything else is refused.

Every file is written to a temporary name and renamed. The step directory is assembled as
``step_X.tmp`` and renamed only after every rank's files exist (a barrier) and the manifest is written;
``latest`` moves after that. A reader verifies sizes and checksums, names the bad file, and falls back to
an older good checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from moe_dist.errors import ConfigError

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt, or was written by a different layout."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds something other than plain data (a global that could run code on load);
    it was refused without running anything."""


# how torch's weights-only unpickler names the global it refused (torch 2.6-2.13), most common form first
_REFUSED_PATTERNS = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module"),
    re.compile(r"call reduce for unrecognized function (.+?)(?: which belongs to .*)?$", re.M),
    re.compile(r"allowlisted via `add_safe_globals`,? but got (.+)$", re.M),
)


def refused_name(message: str) -> str:
    """What torch's UnpicklingError message says was refused: the global it names, else its own words."""
    for pattern in _REFUSED_PATTERNS:
        m = pattern.search(message)
        if m:
            return m.group(1).strip()
    m = re.search(r"WeightsUnpickler error:\s*(\S.*)$", message, re.M)
    detail = m.group(1).strip() if m else (message.strip().splitlines() or ["?"])[-1]
    return f"something the safe loader does not accept ({detail})"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_obj(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write(path, buf.getvalue())


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    root: Path,
    step: int,
    files: dict[str, Any],
    rank: int,
    barrier: Callable[[], None],
    meta: dict,
    keep_last: int,
) -> Path:
    """Every rank calls this with the files it owns; rank 0 finalises. Returns the final directory."""
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()  # why: the temp directory must exist before any rank writes into it
    for name, obj in files.items():
        save_obj(tmp / name, obj)
    barrier()  # why: the manifest may only be written once every rank's shard is complete
    if rank == 0:
        entries = {
            p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.iterdir())
            if not p.name.endswith(".part")
        }
        manifest = dict(meta, step=step, files=entries)
        _atomic_write(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write(root / "latest", final.name.encode())
        _rotate(root, keep_last)
    barrier()  # why: nobody may read ``latest`` (or exit) before it points at a complete checkpoint
    return final


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete step directories under ``root``, oldest first (``.tmp`` ones are half-written saves)."""
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp")
    )


def _rotate(root: Path, keep_last: int) -> None:
    for old in checkpoint_dirs(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def verify(ckpt: Path, names: list[str] | None = None) -> dict:
    """Check the manifest and the named files (all if None); raise CheckpointError naming the bad file."""
    mpath = ckpt / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: manifest {mpath} is missing or unreadable ({e})") from None
    for name in names if names is not None else list(manifest["files"]):
        entry = manifest["files"].get(name)
        path = ckpt / name
        if entry is None:
            raise CheckpointError(f"checkpoint {ckpt}: {name} is not in the manifest")
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt}: file {path} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(
                f"checkpoint file {path} is truncated or altered: {size} bytes, "
                f"manifest says {entry['bytes']}"
            )
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is corrupt: sha256 does not match the manifest")
    return manifest


def verified_checkpoints(
    root: Path, names: list[str], world: int, ep: int
) -> tuple[dict[int, Path], dict[int, str]]:
    """Checkpoints under ``root`` whose manifest and files ``names`` verify for this rank, by step, and
    the reason each other one failed, by step. The caller intersects the steps over ranks and resumes
    from the newest common one, so a bad shard on any rank sends every rank back to the same older
    checkpoint.

    A checkpoint written under a different world size or EP size is a clear ConfigError naming the
    newest such checkpoint, not a fallback (the launch preflight normally refuses it first).
    """
    good: dict[int, Path] = {}
    errors: dict[int, str] = {}
    for ckpt in reversed(checkpoint_dirs(root)):
        step = int(ckpt.name.split("_")[1])
        try:
            manifest = verify(ckpt, names)
        except CheckpointError as e:
            errors[step] = str(e)
            continue
        if manifest.get("world") != world or manifest.get("ep") != ep:
            raise ConfigError(
                f"checkpoint {ckpt} was written with world={manifest.get('world')}, ep={manifest.get('ep')}; "
                f"this run has world={world}, ep={ep}. Resharding is not supported: relaunch with the "
                f"same layout or start a new run (train.resume=false or a new name)"
            )
        good[int(manifest["step"])] = ckpt
    return good, errors


def load_obj(path: Path, allowed: Sequence[Callable] = ()) -> Any:
    """Read one checkpoint file without running code from it.

    torch's weights-only unpickler accepts tensors, numbers, strings, None and containers, plus the types
    in ``allowed`` for this call only. Anything else raises UnsafeCheckpointError, one line naming the file
    and the refused type; a file that cannot be read at all raises CheckpointError.
    """
    try:
        # why scoped: an allowlist added for good would also apply to every other torch.load in the process
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refused checkpoint file {path}: it holds {refused_name(str(e))}, but a checkpoint may hold "
            "only tensors, numbers, strings and containers; nothing from it was run (was it written by "
            "another program or tampered with?)"
        ) from None
    except Exception as e:  # a zip or storage error deep in torch: name the file instead
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"checkpoint file {path} cannot be read: {type(e).__name__}: {first}") from None
