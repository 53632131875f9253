"""Tokenize text into a ``data.kind: tokens`` directory (moe_dist/data/token_files.py has the format);
``python -m moe_dist.prepare_data`` is its command line.

The inputs are cut into pieces: a ``.txt`` file is one document and one piece; a ``.jsonl`` file (one JSON
object a line, the text in ``field``) is cut at line ends every ``chunk_bytes``. Each piece is tokenized on
its own (a pool of ``processes`` workers, each single-threaded) into ``parts/<key>.{train,val}.bin`` plus
``parts/<key>.json``, written last and atomically: a piece whose json exists is finished, and a restarted
run skips it. The key hashes the piece's bytes and every setting that decides its tokens, so the same
content is never tokenized twice and a changed one always is. Then the parts are concatenated in input
order (the output does not depend on the number of processes or on which pieces were reused) and the
manifest is written last. A document goes to validation when a stable hash of its text falls below
``val_fraction``; each document is followed by the tokenizer's EOS.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moe_dist.data.files import DataError
from moe_dist.data.token_files import (
    FORMAT,
    LOCK,
    MANIFEST,
    PARTS,
    SPLITS,
    atomic_write,
    read_manifest,
    split_file,
    token_dtype,
    tokenizer_hash,
)
from moe_dist.runtime.durable import fsync_dir

log = logging.getLogger("moe_dist.prepare_data")

CHUNK_BYTES = 8 << 20
"""A .jsonl file is cut into pieces of about this many bytes (at line ends): the unit of parallel work and
of restart."""
BATCH_DOCS = 64
"""Documents per tokenizer call."""


def _txt_documents(raw: bytes, field: str, where: str, start: int) -> Iterator[str]:
    try:
        yield raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"input {where} is not UTF-8 text (byte {e.start})") from None


def _jsonl_documents(raw: bytes, field: str, where: str, start: int) -> Iterator[str]:
    offset = start
    for line in raw.split(b"\n"):
        if line.strip():
            try:
                obj = json.loads(line)
            except ValueError:
                raise DataError(f"input {where}: the line at byte {offset} is not JSON") from None
            if not isinstance(obj, dict) or field not in obj:
                raise DataError(
                    f"input {where}: the line at byte {offset} has no {field!r} field (choose one with "
                    "--field)"
                )
            if not isinstance(obj[field], str):
                raise DataError(f"input {where}: the {field!r} field at byte {offset} is not a string")
            yield obj[field]
        offset += len(line) + 1


@dataclass(frozen=True)
class InputFormat:
    documents: Callable[[bytes, str, str, int], Iterator[str]]
    """(the piece's bytes, field, input path, the piece's byte offset) -> its documents' texts."""
    splittable: bool
    """Whether a file may be cut into pieces at line ends."""


INPUT_FORMATS = {
    ".txt": InputFormat(_txt_documents, splittable=False),
    ".jsonl": InputFormat(_jsonl_documents, splittable=True),
}
"""One row per input kind, by file suffix."""


@dataclass(frozen=True)
class Piece:
    index: int
    path: str
    start: int
    end: int
    key: str
    """Hash of the piece's bytes and the settings that decide its tokens: the name of its part files."""


@dataclass
class PrepareResult:
    manifest: dict
    tokenized: int
    """Pieces tokenized by this run."""
    reused: int
    """Pieces a previous, interrupted run had finished (or all of them, for a run with nothing to do)."""
    seconds: float


def load_tokenizer(tok_dir: str):
    """``AutoTokenizer.from_pretrained(tok_dir)``, offline; one DataError line if it cannot."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # why: the workers are the parallelism; a tokenizer that also spreads over every core oversubscribes
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not Path(tok_dir).is_dir():
        raise DataError(f"--tokenizer {tok_dir!r} is not a directory")
    if tokenizer_hash(tok_dir) is None:
        raise DataError(f"--tokenizer {tok_dir!r} holds no tokenizer files (tokenizer.json, vocab.json, ...)")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError("prepare_data needs transformers: pip install -e '.[hf]'") from None
    try:
        return AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises several types for a bad directory
        raise DataError(f"--tokenizer {tok_dir!r} cannot be loaded: {' '.join(str(e).split())}") from None


def _cuts(path: Path, size: int, chunk_bytes: int) -> list[int]:
    """Piece boundaries of a splittable file: every ``chunk_bytes``, moved on to the next line end."""
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + chunk_bytes < size:
            f.seek(cuts[-1] + chunk_bytes)
            f.readline()
            if f.tell() >= size:
                break
            cuts.append(f.tell())
    return [*cuts, size]


def plan_pieces(inputs: list[str], settings: str, field: str, chunk_bytes: int) -> list[Piece]:
    pieces: list[Piece] = []
    for name in inputs:
        path = Path(name)
        fmt = INPUT_FORMATS.get(path.suffix)
        if fmt is None:
            raise DataError(f"input {name}: unknown kind {path.suffix!r} (known: {', '.join(INPUT_FORMATS)})")
        if not path.is_file():
            raise DataError(f"input {name}: no such file")
        size = path.stat().st_size
        if fmt.splittable:  # a wrong --field is named now, not after the others' pieces are tokenized
            with open(path, "rb") as f:
                first = next((line for line in f if line.strip()), b"")
            for _ in fmt.documents(first, field, name, 0):
                break
        cuts = _cuts(path, size, chunk_bytes) if fmt.splittable else [0, size]
        with open(path, "rb") as f:
            for start, end in zip(cuts[:-1], cuts[1:], strict=True):
                f.seek(start)
                h = hashlib.sha256(f"{settings}|{path.suffix}|".encode())
                h.update(f.read(end - start))
                pieces.append(Piece(len(pieces), name, start, end, h.hexdigest()[:32]))
    return pieces


_TOKENIZER: tuple[str, object] | None = None


def cached_tokenizer(tok_dir: str):
    global _TOKENIZER
    if _TOKENIZER is None or _TOKENIZER[0] != tok_dir:
        _TOKENIZER = (tok_dir, load_tokenizer(tok_dir))
    return _TOKENIZER[1]


def is_val(text: str, val_fraction: float) -> bool:
    """A document's split: a stable hash of its text (the same on any machine, in any input order)."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h < val_fraction * 2.0**64


def tokenize_piece(job: tuple[Piece, str, str, float, str, Path]) -> int:
    """Tokenize one piece into its part files (the json last); returns its byte count (for the bar)."""
    piece, tok_dir, field, val_fraction, dtype, parts = job
    tok = cached_tokenizer(tok_dir)
    eos, vocab = tok.eos_token_id, len(tok)
    with open(piece.path, "rb") as f:
        f.seek(piece.start)
        raw = f.read(piece.end - piece.start)
    docs = INPUT_FORMATS[Path(piece.path).suffix].documents(raw, field, piece.path, piece.start)
    ids: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    counts = {s: {"tokens": 0, "documents": 0, "bytes": 0} for s in SPLITS}
    batch: list[str] = []

    def flush() -> None:
        encoded = tok(batch, add_special_tokens=False, verbose=False)["input_ids"] if batch else []
        for text, doc in zip(batch, encoded, strict=True):
            split = "val" if is_val(text, val_fraction) else "train"
            row = np.asarray([*doc, eos], dtype=np.int64)
            if row.size and (row.min() < 0 or row.max() >= vocab):  # would wrap around in uint16/uint32
                raise DataError(
                    f"input {piece.path}: the tokenizer gave id {row.max()} >= its length {vocab}"
                )
            ids[split].append(row.astype(dtype))
            c = counts[split]
            c["tokens"] += len(doc) + 1
            c["documents"] += 1
            c["bytes"] += len(text.encode("utf-8"))
        batch.clear()

    for text in docs:
        if text:  # an empty document holds no tokens (and gets no EOS)
            batch.append(text)
        if len(batch) >= BATCH_DOCS:
            flush()
    flush()
    for split in SPLITS:
        arr = np.concatenate(ids[split]) if ids[split] else np.zeros(0, dtype)
        atomic_write(parts / f"{piece.key}.{split}.bin", arr.astype(f"<{arr.dtype.str[1:]}").tobytes())
    atomic_write(parts / f"{piece.key}.json", json.dumps(counts).encode())  # last: the piece is finished
    return piece.end - piece.start


def _check_out(out: Path, job: str, overwrite: bool) -> dict | None:
    """The finished manifest if ``out`` already holds this very job; refuses to clobber anything else."""
    if (out / MANIFEST).is_file():
        try:
            old = json.loads((out / MANIFEST).read_text())
        except ValueError:
            old = {}
        if old.get("job") == job:
            try:
                return read_manifest(out)  # the same job, its files whole: nothing to do
            except DataError as e:
                log.warning("%s; preparing it again", e)
        elif not overwrite:
            raise DataError(
                f"--out {out} holds a dataset prepared from other inputs or settings; pass --overwrite to "
                "replace it, or choose another --out"
            )
        (out / MANIFEST).unlink()  # first: an interrupted overwrite must not look finished
        fsync_dir(out)
        return None
    _refuse_strangers(out)
    return None


def _refuse_strangers(out: Path) -> None:
    """Refuse an ``out`` (without a manifest) holding more than an unfinished preparation leaves."""
    ours = {PARTS, LOCK, *(split_file(s) for s in SPLITS)}
    strangers = [p.name for p in out.iterdir() if p.name not in ours and not p.name.endswith(".tmp")]
    if strangers:
        raise DataError(
            f"--out {out} is not empty and is not a prepare_data directory (it holds {sorted(strangers)[0]!r}"
            "); choose a new or empty directory"
        )


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` exclusively (``flock``, non-blocking) for the preparation: a second run on the same
    directory gets one DataError line instead of writing the same parts and outputs at the same time. The
    kernel releases the lock when its holder exits, however it exits: the file a killed run leaves behind
    blocks nothing (it stays, empty; deleting it could split two runs over two files)."""
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(
                f"--out {out} is being prepared by another prepare_data run right now (it holds {out / LOCK}"
                "); wait for it to finish, or choose another --out"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock (forked tokenizer workers are gone by now)


def prepare(
    tok_dir: str,
    out: str | Path,
    inputs: list[str],
    *,
    field: str = "text",
    val_fraction: float = 0.01,
    processes: int = 1,
    overwrite: bool = False,
    keep_parts: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
    progress: bool = True,
) -> PrepareResult:
    """Tokenize ``inputs`` into ``out`` (see the module docstring); every bad input is one DataError line.
    One run at a time per ``out`` (``exclusive``)."""
    t0 = time.perf_counter()
    if not inputs:
        raise DataError("no inputs: name one or more .txt or .jsonl files")
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if processes < 1:
        raise DataError(f"--processes must be >= 1, got {processes}")
    if chunk_bytes < 1:
        raise DataError(f"the chunk size must be >= 1 byte, got {chunk_bytes}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a directory")
    if out.is_dir() and not (out / MANIFEST).is_file():
        _refuse_strangers(out)  # first: no lock file is written into another program's directory
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out):  # a second run on this directory is refused, not interleaved with this one
        return _prepare(
            tok_dir,
            out,
            inputs,
            field,
            val_fraction,
            processes,
            overwrite,
            keep_parts,
            chunk_bytes,
            progress,
            t0,
        )


def _prepare(
    tok_dir: str,
    out: Path,
    inputs: list[str],
    field: str,
    val_fraction: float,
    processes: int,
    overwrite: bool,
    keep_parts: bool,
    chunk_bytes: int,
    progress: bool,
    t0: float,
) -> PrepareResult:
    tok = cached_tokenizer(tok_dir)
    tok_digest, tok_files = tokenizer_hash(tok_dir)  # type: ignore[misc] - load_tokenizer checked it exists
    if tok.eos_token_id is None:
        raise DataError(f"--tokenizer {tok_dir!r} has no EOS token (it separates the documents)")
    vocab = len(tok)
    dtype = token_dtype(vocab)
    settings = json.dumps([FORMAT, tok_digest, field, val_fraction, dtype])
    pieces = plan_pieces(inputs, settings, field, chunk_bytes)
    job = hashlib.sha256(json.dumps([settings, inputs, [p.key for p in pieces]]).encode()).hexdigest()[:32]
    if out.is_dir():
        done = _check_out(out, job, overwrite)
        if done is not None:
            log.info("%s already holds this dataset (same inputs and settings): nothing to do", out)
            return PrepareResult(done, 0, len(pieces), time.perf_counter() - t0)
    parts = out / PARTS
    parts.mkdir(parents=True, exist_ok=True)
    for stale in parts.glob("*.tmp"):  # a run killed while writing a part
        stale.unlink()
    # why unique keys: the same content twice (a repeated input) is tokenized once, by one worker; two
    # workers writing one part's temporary file at the same time would corrupt it
    todo = list({p.key: p for p in pieces if not (parts / f"{p.key}.json").is_file()}.values())
    total = sum(p.end - p.start for p in pieces)
    reused = total - sum(p.end - p.start for p in todo)
    jobs = [(p, tok_dir, field, val_fraction, dtype, parts) for p in todo]
    # why a with-block: a bad piece's error line must not share a line with an unfinished bar
    with tqdm(
        total=total, initial=reused, unit="B", unit_scale=True, desc="tokenize", disable=not progress
    ) as bar:
        if processes > 1 and len(todo) > 1:
            methods = multiprocessing.get_all_start_methods()
            # why fork where there is one: the workers inherit the loaded tokenizer instead of re-importing
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            with ctx.Pool(min(processes, len(todo))) as pool:
                for n in pool.imap_unordered(tokenize_piece, jobs):
                    bar.update(n)
        else:
            for j in jobs:
                bar.update(tokenize_piece(j))
    manifest = _finish(
        out, pieces, job, inputs, dtype, vocab, tok, tok_dir, tok_digest, tok_files, field, val_fraction
    )
    if not keep_parts:
        shutil.rmtree(parts)
    seconds = time.perf_counter() - t0
    n_tokens = sum(manifest["splits"][s]["tokens"] for s in SPLITS)
    log.info(
        "%s: %d tokens from %.1f MB of text; tokenized %.1f MB in %.1f s (%.2f MB/s, %d processes), %d of %d "
        "pieces reused",
        out,
        n_tokens,
        total / 1e6,
        (total - reused) / 1e6,
        seconds,
        (total - reused) / 1e6 / seconds,
        processes,
        len(pieces) - len(todo),
        len(pieces),
    )
    return PrepareResult(manifest, len(todo), len(pieces) - len(todo), seconds)


def _finish(
    out: Path,
    pieces: list[Piece],
    job: str,
    inputs: list[str],
    dtype: str,
    vocab: int,
    tok,
    tok_dir: str,
    tok_digest: str,
    tok_files: dict,
    field: str,
    val_fraction: float,
) -> dict:
    """Concatenate the parts in input order, then write the manifest (last)."""
    parts = out / PARTS
    counts = [json.loads((parts / f"{p.key}.json").read_text()) for p in pieces]
    splits = {s: {k: sum(c[s][k] for c in counts) for k in ("tokens", "documents", "bytes")} for s in SPLITS}
    if not any(splits[s]["documents"] for s in SPLITS):
        raise DataError(f"the inputs hold no documents (every one of the {len(inputs)} inputs is empty)")
    for split in SPLITS:
        target = out / split_file(split)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as dst:
            for p in pieces:
                with open(parts / f"{p.key}.{split}.bin", "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, target)
        splits[split]["file"] = split_file(split)
    manifest = {
        "format": FORMAT,
        "job": job,
        "dtype": dtype,
        "tokenizer": {
            "name": Path(tok_dir).resolve().name,
            "class": type(tok).__name__,
            "vocab_size": vocab,
            "eos_id": tok.eos_token_id,
            "hash": tok_digest,
            "files": tok_files,
        },
        "field": field,
        "val_fraction": val_fraction,
        "inputs": inputs,
        "splits": splits,
    }
    atomic_write(out / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return manifest
