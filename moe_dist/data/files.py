"""Which files a text or stdlib corpus reads (torch-free: the entry point checks data.paths with it before
importing torch or starting any process group)."""

from __future__ import annotations

import glob
import os
import sysconfig
from pathlib import Path

from moe_dist.errors import ConfigError


class DataError(ConfigError):
    """The corpus cannot be built: a bad path, an empty corpus, or a split too small for two sequences."""


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    # why exclude site-packages: it is not the standard library, and what is installed there changes
    files = sorted(f for f in root.rglob("*.py") if "site-packages" not in f.relative_to(root).parts)
    return root, files


def text_files(patterns: list[str]) -> tuple[Path, list[Path]]:
    files: list[Path] = []
    for pat in patterns:
        hits = [Path(h).resolve() for h in glob.glob(pat, recursive=True)]  # absolute: relative_to("/")
        hits = [h for h in hits if h.is_file()]
        if not hits:
            raise DataError(f"data.paths entry {pat!r} matches no file")
        files.extend(hits)
    files = sorted(set(files))
    # why the common parent as root: the train/validation split hashes paths relative to it, so it
    # stays the same when the data directory is moved or mounted elsewhere
    root = Path(os.path.commonpath(files))
    return (root.parent if root.is_file() else root), files
