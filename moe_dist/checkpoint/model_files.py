"""The model directory's own files a ``model.kind: hf`` run needs after it started: ``config.json`` and the
tokenizer files, copied into the run directory at its first start (``RUN/hf_model/``), so that
``moe_dist.export_hf`` still works once the directory the run config names has moved or gone. A run from
before the copy falls back to that directory (``model_files_dir``).

    store_model_files(Path(cfg.model.hf_config), cfg.run_dir)   # the trainer, rank 0, at the first start
    model_files_dir(run_dir, saved_config["model"])              # the export: where config.json is read
    read_stored_model_files(cfg.model, cfg.run_dir, cfg.train.resume)  # the config check (RunConfig)
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from moe_dist.checkpoint.names import STEP_DIR
from moe_dist.errors import ConfigError
from moe_dist.runtime.durable import fsync_dir as _fsync_dir  # why not checkpoint.verify's: torch-free

if TYPE_CHECKING:
    from moe_dist.models.config import ModelConfig

log = logging.getLogger(__name__)

MODEL_FILES = "hf_model"
"""The run directory's copy of the model directory's config and tokenizer files (no weights)."""
CONFIG = "config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
"""A transformers tokenizer's files (``save_pretrained``'s names): stored with the config, copied into an
export."""


def store_model_files(source: Path, run_dir: Path) -> Path | None:
    """Copy ``source``'s config.json and tokenizer files into ``run_dir/hf_model`` unless a copy is there;
    returns the copy (None: ``source`` holds no config.json). Atomic: the files are written and fsynced in a
    temporary sibling directory, which is renamed into place."""
    dst = run_dir / MODEL_FILES
    if (dst / CONFIG).is_file():
        return dst  # why kept: the first start's files are the run's (a resume's directory may differ)
    if not (source / CONFIG).is_file():
        return None
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_FILES}.", dir=run_dir))
    try:
        for name in (CONFIG, *TOKENIZER_FILES):
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        os.replace(tmp, dst)
        _fsync_dir(run_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("stored %s's config and tokenizer files in %s", source, dst)
    return dst


def model_files_dir(run_dir: Path, model: dict) -> Path | None:
    """Where a run's model config and tokenizer files are read: the run directory's copy, else the directory
    its config names (``model``: the config's model section); None for an inline ``hf_config``."""
    stored = run_dir / MODEL_FILES
    if (stored / CONFIG).is_file():
        return stored
    spec = model.get("hf_pretrained") or model.get("hf_config")
    return Path(spec) if isinstance(spec, str) else None


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir/checkpoints`` holds a checkpoint directory (torch-free: the config check runs before
    torch is imported). A launch with ``train.resume`` then resumes one, or fails: it never starts afresh."""
    root = run_dir / "checkpoints"
    return root.is_dir() and any(p.is_dir() and STEP_DIR.fullmatch(p.name) for p in root.iterdir())


def read_stored_model_files(model: ModelConfig, run_dir: Path, resume: bool) -> None:
    """``model``'s ``hf_config`` directory holds no config.json (moved or deleted): when this launch resumes
    a checkpoint of the run and the run directory holds its copy (``RUN/hf_model/``), the config and
    tokenizer are read from the copy (``model.hf_source``; the checkpoint holds the weights). Else one
    ConfigError line."""
    spec = model.hf_config
    if model.kind != "hf" or not isinstance(spec, str) or (Path(spec) / CONFIG).is_file():
        return
    stored = run_dir / MODEL_FILES
    if resume and (stored / CONFIG).is_file() and has_checkpoint(run_dir):
        model.read_config_from(str(stored))  # the launch's preflight logs it (once: after any re-exec)
        return
    why = "" if not has_checkpoint(run_dir) else f" (and {stored} holds no copy of it to resume with)"
    raise ConfigError(f"model.hf_config={spec!r} is not a directory with a config.json{why}")
