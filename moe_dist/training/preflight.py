"""What a launch does with the run directory it finds, decided from files alone, before any process group.

Every rank reads the same manifest and takes the same decision, so a refused resume ends every rank with
the same one-line error instead of one rank leaving its peers in a collective:

- ``train.resume=false`` in a run directory that already holds a run: refused (``ConfigError`` naming a
  new ``name=...`` or ``train.overwrite=true``, which moves the old run aside, never deletes it), so that
  two runs never share checkpoints or metrics files;
- no checkpoint, or ``train.resume=false`` in a new or moved-aside directory: a fresh start;
- a finished run (its newest checkpoint is at ``train.steps`` or later and ``summary.json`` exists): the
  launch says so and exits 0 without touching anything;
- a checkpoint written under another world size or EP size: resharded (format 2, engine torch or fsdp), else
  refused (``ConfigError``: format 1, or engine deepspeed) — see ``moe_dist.checkpoint.files.layout_refusal``;
- a checkpoint written under another config: keys that change what the model computes are refused;
  the others (learning rate, step budget, logging, ...) are allowed with a warning naming each key;
- a checkpoint trained on data of another tokenizer (its manifest's ``data``, ``data_identity``): refused,
  naming both tokenizer hashes; other data of the same tokenizer (continued training) is allowed with the
  config's ``data.path`` warning.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from moe_dist.checkpoint.files import checkpoint_dirs, layout_refusal, stray_entries
from moe_dist.checkpoint.names import MANIFEST
from moe_dist.data.files import DataError
from moe_dist.data.kinds import DATA_KINDS
from moe_dist.errors import ConfigError
from moe_dist.training.config import RunConfig, keep_global_batch

log = logging.getLogger("moe_dist.train")

# Keys whose change makes the checkpoint a different model (or a different on-disk format). parallel.ep is
# not one: a format-2 checkpoint reshards, and layout_refusal names the checkpoints that cannot.
REFUSED = ("model.", "engine", "deepspeed.zero_stage")
# Keys that only say where the run lives (the run directory is found through them).
IGNORED = ("name", "out_dir")
# The nonce file's name prefix (moe_dist/trainer.py checks that every rank sees the run directory).
SHARED_CHECK = ".shared-check-"


def used_entries(run_dir: Path) -> list[str]:
    """What ``run_dir`` holds (a nonce file of the shared-directory check aside): empty for a new run."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(SHARED_CHECK))


def move_aside(run_dir: Path) -> Path:
    """Rename ``run_dir`` to ``<name>.old-<UTC time>`` beside it (a counter if taken); nothing is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dst = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while dst.exists():
        dst = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
        n += 1
    run_dir.rename(dst)
    return dst


def claim_out_dir(out: Path, overwrite: bool, rank: int = 0) -> str | None:
    """The study tools' ``--out``: why a used one is refused (one line), or None. With ``overwrite`` a used
    one is moved aside by rank 0 (``<out>.old-<time>``, nothing deleted) and None returned."""
    used = used_entries(out)
    if not used:
        return None
    if not overwrite:
        shown = ", ".join(used[:5]) + (", ..." if len(used) > 5 else "")
        return (
            f"--out {out} already holds results ({shown}); use another --out, or add --overwrite to move "
            f"them aside (to {out.name}.old-<time>, nothing deleted)"
        )
    if rank == 0:
        log.warning("--overwrite: moved %s aside to %s", out, move_aside(out))
    return None


def fresh_start(cfg: RunConfig, rank: int) -> None:
    """``train.resume=false``: refuse a used run directory unless ``train.overwrite=true``, which moves it
    aside (rank 0 only, before any process group: the other ranks write nothing before it exists)."""
    used = used_entries(cfg.run_dir)
    if not used:
        return
    if not cfg.train.overwrite:
        shown = ", ".join(used[:5]) + (", ..." if len(used) > 5 else "")
        raise ConfigError(
            f"run directory {cfg.run_dir} already holds a run ({shown}) and train.resume=false would start "
            f"another one in it; use another name=... for the new run, or add train.overwrite=true to move "
            f"the old run aside (to {cfg.run_dir.name}.old-<time>, nothing deleted)"
        )
    if rank == 0:
        dst = move_aside(cfg.run_dir)
        log.warning("train.overwrite=true: moved the old run %s aside to %s", cfg.run_dir, dst)


# Keys added after checkpoints began to store their config, with the value that means what a checkpoint
# without the key was trained under: absent from a saved config, they read as this value.
ADDED_KEYS = {
    "model.moe.aux_loss_counts": "routed",
    "model.moe.dispatch": "pairs",
    "fsdp.reshard_after_forward": True,
    "model.vocab_size": 256,
    "model.moe.overlap_shared": False,
}
# Engines whose checkpoints are the same global format: a resume may switch between them.
SAME_FORMAT_ENGINES = {"torch", "fsdp"}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """(refused, allowed): one ``key: old -> new`` line per differing key."""
    a, b = flatten(saved), flatten(now)
    a.update({k: v for k, v in ADDED_KEYS.items() if k not in a and k in b})
    refused, allowed = [], []
    for key in sorted(set(a) | set(b)):
        if key in IGNORED or a.get(key) == b.get(key):
            continue
        line = f"{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}"
        switch = key == "engine" and {a.get(key), b.get(key)} <= SAME_FORMAT_ENGINES
        (refused if not switch and (key == "engine" or key.startswith(REFUSED)) else allowed).append(line)
    return refused, allowed


def newest_manifest(root: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint whose manifest reads, with that manifest (files are verified later)."""
    for ckpt in reversed(checkpoint_dirs(root)):
        try:
            return ckpt, json.loads((ckpt / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
    return None


def stored_global_batch(manifest: dict) -> int | None:
    """Sequences per optimizer step of the run that wrote ``manifest`` (older checkpoints: the product of
    their config's micro_batch and grad_accum and their world size); None if it cannot be told."""
    if manifest.get("global_batch"):
        return int(manifest["global_batch"])
    train = (manifest.get("config") or {}).get("train") or {}
    if train.get("global_batch"):
        return int(train["global_batch"])
    try:
        return int(train["micro_batch"]) * int(train.get("grad_accum", 1)) * int(manifest["world"])
    except (KeyError, TypeError, ValueError):
        return None


_TOKENIZERS: dict[tuple[str, str], dict | None] = {}
"""(data.kind, data.path) -> its tokenizer's name and hash: read once per process (each save asks)."""


def data_identity(cfg: RunConfig) -> dict:
    """What each checkpoint's manifest stores of the data it was trained on (``data``): the kind, the path,
    and the tokenizer's name and hash from the data's manifest (None: bytes; a hash of None: unreadable).
    Same vocabulary size or not, data of another tokenizer means other text to the model."""
    key = (cfg.data.kind, cfg.data.path)
    if key not in _TOKENIZERS:
        try:
            tok = DATA_KINDS[cfg.data.kind].tokenizer(cfg.data)
            _TOKENIZERS[key] = None if tok is None else {"name": tok["name"], "hash": tok["hash"]}
        except (DataError, OSError):  # why not raise: a save must never fail on it (the data is mapped)
            _TOKENIZERS[key] = {"name": None, "hash": None}
    return {"kind": cfg.data.kind, "path": cfg.data.path, "tokenizer": _TOKENIZERS[key]}


def _tokenizer_hash(data: dict) -> str | None:
    """The tokenizer's hash, "bytes" for byte data (None: not known)."""
    return "bytes" if data.get("tokenizer") is None else data["tokenizer"].get("hash")


def _describe(data: dict) -> str:
    tok = data.get("tokenizer")
    if tok is None:
        return f"bytes (data.kind={data.get('kind')})"
    return f"tokenizer {tok.get('name')!r} (hash {str(tok.get('hash'))[:12]}, data.path={data.get('path')!r})"


def check_same_data(cfg: RunConfig, ckpt: Path, manifest: dict, rank: int) -> None:
    """Refuse (one ConfigError line) a resume on data of another tokenizer than the checkpoint's (or bytes
    against tokens); a checkpoint that does not record its data (older) is resumed with a warning."""
    now, saved = data_identity(cfg), manifest.get("data")
    old = _tokenizer_hash(saved) if isinstance(saved, dict) else None
    new = _tokenizer_hash(now)
    if old is None or new is None:
        if not (old is None and new == "bytes") and rank == 0:  # bytes then: a record could say no more
            log.warning(
                "checkpoint %s does not record the tokenizer of the data it was trained on (it predates the "
                "record, or the data was unreadable): resuming without checking that it is %s's",
                ckpt,
                _describe(now),
            )
        return
    if old != new:
        raise ConfigError(
            f"checkpoint {ckpt} was trained on data of {_describe(saved)}, but this launch's data is of "
            f"{_describe(now)}: the same ids would mean other text to the model; prepare the data with the "
            f"run's tokenizer, or start a new run (another name=...)"
        )


def preflight(cfg: RunConfig, world: int, rank: int) -> dict | None:
    """Decide from the run directory's files whether this launch may start; raise ConfigError if not.

    Returns the finished run's summary when there is nothing left to train, else None.
    """
    if not cfg.train.resume:
        fresh_start(cfg, rank)
        derived = keep_global_batch(cfg, world)
        if derived and rank == 0:
            log.warning("%s", derived)
        return None
    stray = stray_entries(cfg.run_dir / "checkpoints")
    if stray and rank == 0:
        log.warning(
            "ignoring %s in %s: only directories named step_<8 digits> are checkpoints",
            ", ".join(stray),
            cfg.run_dir / "checkpoints",
        )
    found = newest_manifest(cfg.run_dir / "checkpoints")
    # the global batch first: the config compared below is the one this launch trains with
    derived = keep_global_batch(
        cfg, world, stored_global_batch(found[1]) if found else None, str(found[0]) if found else ""
    )
    if derived and rank == 0:
        log.warning("%s", derived)
    if found is None:
        return None
    ckpt, manifest = found
    if cfg.model.hf_source != cfg.model.hf_config and rank == 0:  # config.RunConfig: read_stored_model_files
        log.info(
            "model directory %s holds no config.json: resuming %s, whose checkpoint holds the weights, with "
            "the config and tokenizer files the run stored in %s",
            cfg.model.hf_config,
            cfg.run_dir,
            cfg.model.hf_source,
        )
    what_to_do = (
        "relaunch with the checkpoint's settings, or start a new run: another name=..., or "
        "train.resume=false train.overwrite=true (moves this run aside, deletes nothing)"
    )
    refusal = layout_refusal(manifest, world, cfg.parallel.ep, cfg.engine)
    if refusal is not None:
        raise ConfigError(f"checkpoint {ckpt} {refusal}")
    if (manifest.get("world"), manifest.get("ep")) != (world, cfg.parallel.ep) and rank == 0:
        log.info(
            "checkpoint %s was written with world=%s, ep=%s; resharding it to world=%d, ep=%d",
            ckpt,
            manifest.get("world"),
            manifest.get("ep"),
            world,
            cfg.parallel.ep,
        )
    saved = manifest.get("config")
    if saved is None:  # written before checkpoints carried their config: only the digest can be compared
        if manifest.get("config_digest") not in (None, cfg.digest()) and rank == 0:
            log.warning(
                "checkpoint %s was written under another config (digest %s, now %s); it predates "
                "per-key comparison, so the changed keys cannot be named",
                ckpt,
                manifest.get("config_digest"),
                cfg.digest(),
            )
    else:
        refused, allowed = config_changes(saved, cfg.to_dict())
        if refused:
            raise ConfigError(
                f"checkpoint {ckpt} was written under another model or layout ({'; '.join(refused)}); "
                f"these keys change what the checkpoint means: {what_to_do}"
            )
        if allowed and rank == 0:
            log.warning("resuming %s under a changed config: %s", ckpt, "; ".join(allowed))
    check_same_data(cfg, ckpt, manifest, rank)
    summary_path = cfg.run_dir / "summary.json"
    if int(manifest.get("step", -1)) >= cfg.train.steps and summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except ValueError:
            return None  # an unreadable summary: resume and write it again
        if rank == 0:
            log.info(
                "run %s is already complete at step %s; its results (summary.json, metrics) are kept as "
                "they are. Raise train.steps to train further, or use another name=... for a new run",
                cfg.run_dir,
                manifest.get("step"),
            )
        return summary
    return None
