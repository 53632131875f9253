"""The on-disk format of a tokenized dataset: what ``python -m moe_dist.prepare_data`` writes and
``data.kind: tokens`` reads. Torch-free (the launch checks it before any process group).

    DATA_DIR/train.bin       the train split's token ids, documents one after another, each followed by EOS
    DATA_DIR/val.bin         the same for the validation split (a document's split: a stable hash of its text)
    DATA_DIR/manifest.json   written last (its presence means the directory is complete): the format, the
                             dtype (little-endian uint16 when the vocabulary fits, else uint32), the tokenizer
                             (name, vocabulary, EOS id, a hash of its files), and per split the token,
                             document and UTF-8 byte counts (bits per byte = nats x tokens / (ln 2 x bytes))
    DATA_DIR/parts/          an unfinished preparation's finished pieces (removed at the end)
    DATA_DIR/.lock           held (flock) by the prepare_data run writing the directory; empty, left in place
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from moe_dist.data.files import DataError
from moe_dist.runtime.durable import atomic_write as _durable_write
from moe_dist.runtime.durable import file_sha256

FORMAT = "moe_dist.tokens/1"
MANIFEST = "manifest.json"
PARTS = "parts"
LOCK = ".lock"
SPLITS = ("train", "val")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
)
"""The files that define a tokenizer (transformers' save_pretrained names); their hash names the tokenizer."""
ITEMSIZE = {"uint16": 2, "uint32": 4}


def split_file(split: str) -> str:
    return f"{split}.bin"


def token_dtype(vocab: int) -> str:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return "uint16" if vocab <= 1 << 16 else "uint32"


def tokenizer_hash(directory: str | Path) -> tuple[str, dict[str, str]] | None:
    """(hash, {file: sha256}) of the tokenizer files in ``directory``; None when it holds none. The hash
    covers the file names and contents only, so a copy of the directory has the same hash."""
    files = {n: file_sha256(Path(directory) / n) for n in TOKENIZER_FILES if (Path(directory) / n).is_file()}
    if not files:
        return None
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return digest, files


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared directory, checked against its token files (one DataError line if not)."""
    root = Path(data_dir)
    path = root / MANIFEST
    if not path.is_file():
        unfinished = (root / PARTS).is_dir()
        why = "an unfinished preparation: run prepare_data again" if unfinished else "no manifest"
        raise DataError(
            f"data.path={str(data_dir)!r} is not a prepared token directory ({why}; make one with "
            "python -m moe_dist.prepare_data)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a {FORMAT} manifest")
    try:
        itemsize = ITEMSIZE[manifest["dtype"]]
        wants = {s: int(manifest["splits"][s]["tokens"]) * itemsize for s in SPLITS}
        _ = (
            manifest["tokenizer"]["vocab_size"],
            manifest["tokenizer"]["hash"],
            manifest["splits"]["val"]["bytes"],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path} is incomplete ({type(e).__name__}: {e}): prepare the data again") from None
    for split, want in wants.items():
        f = root / split_file(split)
        have = f.stat().st_size if f.is_file() else None
        if have != want:
            raise DataError(f"{f} holds {have} bytes, the manifest says {want}: prepare the data again")
    return manifest


def atomic_write(path: Path, data: bytes) -> None:
    """``moe_dist.runtime.durable.atomic_write`` under a ``.tmp`` name (what a restarted prepare clears)."""
    _durable_write(path, data, suffix=".tmp")
