"""Durable file writes, shared by every wing that writes a user's files (checkpoints, the run directory,
prepared token data): a reader sees a whole file or none, and a committed rename survives a power cut; and
the one file hash they check files by."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (a rename into it) durable (POSIX; a no-op where a
    directory cannot be opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, suffix: str = ".part") -> None:
    """Write ``data`` to ``path`` durably: a temporary name (``path`` + ``suffix``), fsync, rename, fsync of
    the directory (why: a rename is durable only once its directory is, so a power cut cannot leave a
    committed name empty)."""
    tmp = path.with_name(path.name + suffix)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
