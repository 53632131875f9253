"""Reading checkpoints back: the directory listing, the manifest check (sizes and sha256), rotation
(keep the newest that verify, set aside the ones that do not), the files a rank reads at a layout, and the
weights-only loader. The on-disk layout is described in ``moe_dist.checkpoint.files``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from moe_dist.checkpoint.names import (
    DENSE,
    MANIFEST,
    OWN,
    STEP_DIR,
    experts_file,
    rank_file,
    step_of,
)
from moe_dist.errors import CheckpointError, ConfigError
from moe_dist.runtime.durable import file_sha256 as _sha256
from moe_dist.runtime.durable import fsync_dir as _fsync_dir
from moe_dist.runtime.unpickle import refused_name

log = logging.getLogger("moe_dist.checkpoint.files")


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds something other than plain data (a global that could run code on load);
    it was refused without running anything."""


def stray_entries(root: Path) -> list[str]:
    """Entries of ``root`` that are neither checkpoints nor names of our own (``step_6.bak``, notes, ...):
    ignored, and named once in a warning by the launch preflight."""
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if not (p.is_dir() and STEP_DIR.fullmatch(p.name)) and not OWN.fullmatch(p.name)
    )


_verified: set[tuple[str, int]] = set()
"""(checkpoint path, manifest mtime) that this process wrote or verified in full: rotation does not read
them again."""


def _verifies(ckpt: Path) -> bool:
    try:
        key = (str(ckpt), (ckpt / MANIFEST).stat().st_mtime_ns)
    except OSError:
        return False
    if key in _verified:
        return True
    try:
        verify(ckpt)
    except CheckpointError as e:
        log.warning("%s", e)
        return False
    _verified.add(key)
    return True


def set_aside(ckpt: Path) -> Path:
    """Rename a checkpoint that does not verify to ``step_X.corrupt`` (never deleted: a user may want to
    look at it); it is no longer a checkpoint."""
    dst = ckpt.with_name(ckpt.name + ".corrupt")
    n = 0
    while dst.exists():
        n += 1
        dst = ckpt.with_name(f"{ckpt.name}.corrupt.{n}")
    os.replace(ckpt, dst)
    _fsync_dir(ckpt.parent)
    log.warning("checkpoint %s does not verify: set aside as %s (not deleted, never resumed)", ckpt, dst.name)
    return dst


def rotate(root: Path, keep_last: int, protect: Sequence[str] = ()) -> None:
    """Keep the newest ``keep_last`` checkpoints that verify and those named in ``protect`` (the one this
    launch resumed from); set aside the newer ones that do not verify; delete the older rest."""
    kept = 0
    for ckpt in reversed(checkpoint_dirs(root)):
        if kept < keep_last:
            if _verifies(ckpt):
                kept += 1
            else:
                set_aside(ckpt)
        elif ckpt.name not in protect:
            shutil.rmtree(ckpt, ignore_errors=True)


def checkpoint_dirs(root: Path) -> list[Path]:
    """Checkpoint directories under ``root`` (names ``step_<8 digits>``), oldest first; everything else
    (``.tmp`` half-written saves, ``.corrupt`` set-aside ones, a user's ``step_6.bak``) is not one."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name))


def verify(ckpt: Path, names: list[str] | None = None) -> dict:
    """Check the manifest and the named files (all if None); raise CheckpointError naming the bad file."""
    mpath = ckpt / MANIFEST
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


FORMAT = 2
"""Written into every manifest; a manifest without it is format 1 (stacked experts, layout-bound)."""


def layout_refusal(manifest: dict, world: int, ep: int, engine: str) -> str | None:
    """Why the checkpoint of ``manifest`` cannot resume at (world, ep), or None if it can."""
    w, e = manifest.get("world"), manifest.get("ep")
    if (w, e) == (world, ep):
        return None
    was = f"was written with world={w}, ep={e}; this launch has world={world}, ep={ep}"
    if manifest.get("format", 1) < FORMAT:
        return (
            f"{was}, and it predates per-expert checkpoints, so it resumes only at its own layout: relaunch "
            f"with {w} ranks and parallel.ep={e}, or start a new run (another name=..., or "
            "train.resume=false train.overwrite=true, which moves this run aside)"
        )
    if engine == "deepspeed":
        return (
            f"{was}. engine=deepspeed checkpoints hold ZeRO optimizer partitions of the layout that wrote "
            f"them and are not resharded here: relaunch with {w} ranks and parallel.ep={e}. DeepSpeed's "
            "own route to another layout, its universal-checkpoint conversion "
            "(python -m deepspeed.checkpoint.ds_to_universal), needs a checkpoint written by "
            "engine.save_checkpoint, which we do not write (its loader unpickles anything); engine=torch "
            "checkpoints reshard"
        )
    return None


def files_to_read(
    manifest: dict, rank: int, world: int, ep: int, num_experts: int, needed: list[int] | None = None
) -> list[str]:
    """The files of a checkpoint that rank ``rank`` of a (world, ep) launch reads (and verifies).

    ``needed``: the expert ids this rank's slots hold (None: the contiguous share of its EP rank). A file
    is read when its covering range [lo, hi) holds one of them (a cover may read a file more, never less).
    """
    ep_rank = rank % ep
    if manifest.get("format", 1) < FORMAT:
        return [rank_file(rank), DENSE, experts_file(ep_rank)]
    if needed is None:
        per = num_experts // ep
        needed = list(range(ep_rank * per, (ep_rank + 1) * per))
    experts = [n for n, (a, b) in sorted(manifest["experts"].items()) if any(a <= e < b for e in needed)]
    # why rank % saved world: a rank beyond the old world takes an old rank's RNG (same layout: its own)
    return [DENSE, *experts, rank_file(rank % int(manifest["world"]))]


def verified_checkpoints(
    root: Path, names_for: Callable[[dict], list[str]]
) -> tuple[dict[int, tuple[Path, dict]], dict[int, str]]:
    """Checkpoints under ``root`` whose manifest and the files ``names_for(manifest)`` verify for this rank,
    by step (with their manifests), and the reason each other one failed, by step. The caller intersects
    the steps over ranks and resumes from the newest common one, so a bad shard on any rank sends every
    rank back to the same older checkpoint.

    ``names_for`` raises ConfigError for a checkpoint this launch may not resume (the launch preflight
    normally refuses it first): that is a clear error naming the newest such checkpoint, not a fallback.
    """
    good: dict[int, tuple[Path, dict]] = {}
    errors: dict[int, str] = {}
    for ckpt in reversed(checkpoint_dirs(root)):
        step = step_of(ckpt.name)
        try:
            manifest = verify(ckpt, [])
            manifest = verify(ckpt, names_for(manifest))
        except CheckpointError as e:
            errors[step] = str(e)
            continue
        except ConfigError as e:
            raise ConfigError(f"checkpoint {ckpt} {e}") from None
        good[int(manifest["step"])] = (ckpt, manifest)
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
