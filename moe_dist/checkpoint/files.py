"""Sharded, atomic checkpoints with a checksummed manifest.

Layout of ``checkpoints/`` (format 2, the global view of ``moe_dist.checkpoint.global_state``)::

    step_00000100/dense.pt          rank 0: replicated params and buffers (incl. expert biases), their
                                    AdamW state by name, param groups, scheduler, step, controller, the
                                    val loss of the model it holds (the resume self-check)
    step_00000100/experts_ep{e}.pt  the first replica of EP rank e: the weights and AdamW state of the
                                    experts whose first replica (in EP-rank order) it holds, one key per
                                    expert id (``blocks.3.ffn.experts.e17.w1``); dense.pt also stores each
                                    MoE layer's placement
    step_00000100/rank{r}.pt        every rank: RNG states (``engine: deepspeed``: its ZeRO partition too)
    step_00000100/manifest.json     sha256 and size of every file, world, ep, step, the range of expert
                                    ids [lo, hi) that covers each experts file's ids, the placements, the
                                    resolved config (``moe_dist.export_hf`` builds the model from it)
    step_00000090.corrupt           a checkpoint that did not verify when rotation met it: set aside,
                                    never deleted, never resumed

Only directories named ``step_<8 digits>`` are checkpoints; a resume takes the newest one that verifies on
every rank (there is no ``latest`` pointer: a pointer could name a checkpoint that no longer verifies).

A rank resuming under another (world, EP) reads dense.pt, the experts files that hold the ids it now owns,
and one rank file for its RNG. Format 1 (no ``format`` in the manifest: optimizer state in the rank files,
experts stacked per EP rank) still loads at the layout that wrote it; at another it is refused.

Every file is plain data: tensors, numbers, strings, None and containers, plus (rank files of
``engine: deepspeed``) the few DeepSpeed types its ZeRO optimizer state holds. Files are read with torch's
weights-only unpickler, so loading a checkpoint never runs code from it; anything else is refused.

Every file is written to a temporary name, fsynced and renamed, and its directory fsynced. The step
directory is assembled as ``step_X.tmp`` and renamed (then ``checkpoints/`` fsynced) only after every
rank's files exist and the manifest is written. A failure on any rank (an OSError, a non-finite tensor)
is gathered: every rank raises the same ``SaveError``, the ``.tmp`` directory is removed, and the previous
checkpoint stays the newest. Rotation keeps the newest ``keep_last`` checkpoints that verify (and the one
the launch resumed from). A reader verifies sizes and checksums, names the bad file, and falls back to an
older good checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from moe_dist.checkpoint.names import MANIFEST, STEP_DIR, step_dir_name
from moe_dist.checkpoint.verify import (
    FORMAT,
    UnsafeCheckpointError,
    _sha256,
    _verified,
    _verifies,
    checkpoint_dirs,
    files_to_read,
    layout_refusal,
    load_obj,
    rotate,
    set_aside,
    stray_entries,
    verified_checkpoints,
    verify,
)
from moe_dist.errors import CheckpointError
from moe_dist.runtime.durable import atomic_write as _atomic_write  # why this name: tests fail it on one rank
from moe_dist.runtime.durable import fsync_dir as _fsync_dir

__all__ = [  # the writers here, and the readers re-exported (``moe_dist.checkpoint.verify``)
    "FORMAT",
    "STEP_DIR",
    "AsyncSave",
    "CheckpointError",
    "SaveError",
    "UnsafeCheckpointError",
    "atomic_write_text",
    "begin_save",
    "checkpoint_dirs",
    "commit_save",
    "files_to_read",
    "layout_refusal",
    "load_obj",
    "nonfinite_tensor",
    "save_checkpoint",
    "save_obj",
    "set_aside",
    "step_dir_name",
    "stray_entries",
    "verified_checkpoints",
    "verify",
]

log = logging.getLogger(__name__)


def atomic_write_text(path: Path, text: str) -> None:
    """``_atomic_write`` for text files of the run directory (summary.json, config.yaml)."""
    _atomic_write(path, text.encode())


def save_obj(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write(path, buf.getvalue())


class SaveError(CheckpointError):
    """A checkpoint could not be written on some rank; nothing of it was committed."""


Gather = Callable[[Any], list]
"""``gather(x)`` returns every rank's x, by rank (a collective: every rank calls it)."""


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def nonfinite_tensor(files: dict[str, Any]) -> str | None:
    """The first floating tensor in ``files`` holding NaN or Inf, named by its key path, or None."""

    def walk(obj: Any, path: list[str]) -> str | None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
                return ".".join(path)
            return None
        if isinstance(obj, dict):
            items = obj.items()
        elif isinstance(obj, list | tuple):
            items = enumerate(obj)
        else:
            return None
        for k, v in items:
            found = walk(v, [*path, str(k)])
            if found is not None:
                return found
        return None

    for name, obj in files.items():
        found = walk(obj, [])
        if found is not None:
            # why the parameter name first: ``model.blocks.1.ffn.experts.e3.w1`` reads as the model's tensor
            return f"{found} (in {name})"
    return None


def _agree(gather: Gather, error: str | None, step: int, tmp: Path, rank: int) -> None:
    """Every rank: if any rank has an error, rank 0 removes the temporary directory and every rank raises
    the same SaveError naming the first failing rank (why: a rank that failed alone would leave its peers
    waiting in the next collective)."""
    results = gather(error)
    failed = [(r, err) for r, err in enumerate(results) if err is not None]
    if not failed:
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    r, err = failed[0]
    more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
    raise SaveError(f"checkpoint of step {step} not saved: rank {r}: {err}{more}; nothing of it was kept")


def begin_save(root: Path, step: int, rank: int, gather: Gather) -> Path:
    """Every rank: the temporary directory of the checkpoint of ``step``, created by rank 0."""
    tmp = root / (step_dir_name(step) + ".tmp")
    error = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = _describe(e)
    _agree(gather, error, step, tmp, rank)  # why: the temp directory must exist before any rank writes
    return tmp


def write_files(tmp: Path, files: dict[str, Any]) -> dict[str, dict]:
    """Write this rank's files into ``tmp``; their manifest entries (sha256 of the bytes written, size).
    A file holding a non-finite tensor is refused before anything is written."""
    bad = nonfinite_tensor(files)
    if bad is not None:
        raise ValueError(f"tensor {bad} holds NaN or Inf; a checkpoint never stores non-finite values")
    entries = {}
    for name, obj in files.items():
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
        _atomic_write(tmp / name, data)
        entries[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return entries


def commit_save(
    root: Path,
    step: int,
    rank: int,
    gather: Gather,
    meta: dict,
    keep_last: int,
    entries: dict[str, dict] | None = None,
    protect: Sequence[str] = (),
) -> Path:
    """Once every rank's files are in the temp directory: rank 0 writes the manifest (from ``entries``, or
    by reading the files), renames the directory into place (both made durable) and rotates. Every rank
    calls it; a failure on rank 0 is raised on every rank as SaveError."""
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    error = None
    if rank == 0:
        try:
            if entries is None:
                entries = {
                    p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size}
                    for p in sorted(tmp.iterdir())
                    if not p.name.endswith(".part")
                }
            manifest = dict(meta, step=step, files=dict(sorted(entries.items())))
            _atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
            if final.exists():  # a step saved again (a replay): a good older copy is replaced, a bad one
                if _verifies(final):  # set aside
                    shutil.rmtree(final)
                else:
                    set_aside(final)
            os.replace(tmp, final)
            _fsync_dir(root)  # why: the rename is the commit; durable before any older one is deleted
            _verified.add((str(final), (final / MANIFEST).stat().st_mtime_ns))
        except OSError as e:
            error = _describe(e)
    _agree(gather, error, step, tmp, rank)  # why: nobody may exit before the checkpoint is complete
    if rank == 0:
        try:
            rotate(root, keep_last, protect)
        except OSError as e:  # the new checkpoint is committed; an old one left behind costs only disk
            log.warning("checkpoint rotation under %s failed: %s", root, _describe(e))
    return final


def save_checkpoint(
    root: Path,
    step: int,
    files: dict[str, Any],
    rank: int,
    gather: Gather,
    meta: dict,
    keep_last: int,
    protect: Sequence[str] = (),
) -> Path:
    """Every rank calls this with the files it owns; rank 0 finalises. Returns the final directory. Any
    rank's failure (an OSError, a non-finite tensor) raises the same SaveError on every rank, with the
    temporary directory removed and the previous checkpoint still the newest."""
    tmp = begin_save(root, step, rank, gather)
    error = None
    try:
        write_files(tmp, files)
    except (OSError, ValueError) as e:
        error = _describe(e)
    _agree(gather, error, step, tmp, rank)  # why: the manifest waits for every rank's complete files
    return commit_save(root, step, rank, gather, meta, keep_last, None, protect)


def _snapshot(obj: Any) -> Any:
    """A copy of ``obj`` that training can no longer change: tensors copied to host memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple) and type(obj) in (list, tuple):
        return type(obj)(_snapshot(v) for v in obj)
    return copy.deepcopy(obj)


class AsyncSave:
    """One checkpoint whose files this rank writes in a background thread (``train.async_save``).

    The caller's stall is the host copy of its state; serialising, hashing and writing happen in the
    thread. ``finish`` (every rank, together) waits for the thread, gathers every rank's errors and
    manifest entries and commits as ``save_checkpoint`` does: manifest, rename. Until then the checkpoint
    is a ``.tmp`` directory that no resume reads.
    """

    def __init__(
        self,
        root: Path,
        step: int,
        files: dict[str, Any],
        rank: int,
        gather: Gather,
        meta: dict,
        keep_last: int,
        protect: Sequence[str] = (),
    ) -> None:
        self.root, self.step, self.rank = root, step, rank
        self.meta, self.keep_last, self.protect = meta, keep_last, protect
        self.tmp = begin_save(root, step, rank, gather)
        self._files: dict[str, Any] | None = _snapshot(files)
        self.entries: dict[str, dict] = {}
        self.error: str | None = None
        self._thread = threading.Thread(target=self._write, name=f"ckpt-{step}", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        try:
            assert self._files is not None
            self.entries = write_files(self.tmp, self._files)
        except Exception as e:  # reported on every rank by finish()
            self.error = _describe(e)
        finally:
            self._files = None  # why: free the host copy as soon as it is on disk

    def done(self) -> bool:
        return not self._thread.is_alive()

    def finish(self, gather: Gather) -> Path:
        """Every rank: wait for the writes, then commit."""
        self._thread.join()
        _agree(gather, self.error, self.step, self.tmp, self.rank)
        results = gather(self.entries)
        entries = {name: e for ent in results for name, e in ent.items()}
        return commit_save(
            self.root, self.step, self.rank, gather, self.meta, self.keep_last, entries, self.protect
        )
