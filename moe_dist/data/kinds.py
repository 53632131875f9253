"""The data kinds, one row each: ``data.kind`` names a row of ``DATA_KINDS``. Torch-free: the config and the
launch read the table before any process group; the corpus class is imported only when one is built.

A corpus (``Corpus`` of corpus.py, ``TokenCorpus`` of tokens.py) serves ``batch``/``sequences`` by the one
window rule of corpus.py (``window_starts``), a ``description``, ``vocab_size`` (every id is below it) and
``tokens_per_byte`` of its validation split (bits per byte = val loss x tokens_per_byte / ln 2).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moe_dist.data.files import DataError, text_files
from moe_dist.data.token_files import SPLITS, read_manifest

DataConfig = Any
"""moe_dist.data.config.DataConfig (which imports this table: named here only, to keep the import one way)."""

BYTE_VOCAB = 256


def _no_check(cfg: DataConfig, seq_len: int) -> None:
    return None


def _check_text(cfg: DataConfig, seq_len: int) -> None:
    text_files(cfg.paths)


def _check_tokens(cfg: DataConfig, seq_len: int) -> None:
    manifest = read_manifest(cfg.path)
    for split in SPLITS:
        if not manifest["splits"][split]["tokens"]:
            what = "the dataset is empty" if split == "train" else "raise prepare_data's --val-fraction"
            raise DataError(f"data.path={cfg.path!r}: its {split} split holds no tokens ({what})")
    for split in SPLITS:
        check_split_size(cfg.path, split, manifest["splits"][split]["tokens"], seq_len)


def check_split_size(path: str, split: str, n: int, seq_len: int) -> None:
    if n < 2 * (seq_len + 1):
        raise DataError(
            f"data.path={path!r}: its {split} split holds {n} tokens, too few for sequences of {seq_len} "
            f"(it needs >= {2 * (seq_len + 1)})"
        )


def _byte_vocab(cfg: DataConfig) -> int:
    return BYTE_VOCAB


def _token_vocab(cfg: DataConfig) -> int:
    return int(read_manifest(cfg.path)["tokenizer"]["vocab_size"])


def _no_tokenizer(cfg: DataConfig) -> dict | None:
    return None


def _manifest_tokenizer(cfg: DataConfig) -> dict | None:
    return read_manifest(cfg.path)["tokenizer"]


@dataclass(frozen=True)
class DataKind:
    build: str
    """"module:Class" whose ``build(cfg, seq_len, rank, world, seed)`` makes the corpus."""
    needs: str | None
    """The DataConfig field this kind needs set (None: none)."""
    check: Callable[[DataConfig, int], None]
    """(data config, seq_len): what the launch checks before any process group (a bad path, an empty dataset,
    a split too small for two sequences): one DataError line."""
    vocab: Callable[[DataConfig], int]
    """Every token id of the data is below this; the byte LM's embedding takes it as its vocab."""
    tokenizer: Callable[[DataConfig], dict | None]
    """The tokenizer the data was made with (the manifest's entry: name, vocab_size, hash, files), or None."""
    help: str


def _bytes(needs: str | None, check: Callable[[DataConfig, int], None], help: str) -> DataKind:
    return DataKind("moe_dist.data.corpus:Corpus", needs, check, _byte_vocab, _no_tokenizer, help)


DATA_KINDS: dict[str, DataKind] = {
    "stdlib": _bytes(None, _no_check, "this interpreter's stdlib source, as bytes"),
    "text": _bytes("paths", _check_text, "files or globs, as bytes"),
    "synthetic": _bytes(None, _no_check, "Zipf-skewed topics of bytes"),
    "tokens": DataKind(
        "moe_dist.data.tokens:TokenCorpus",
        "path",
        _check_tokens,
        _token_vocab,
        _manifest_tokenizer,
        "a directory written by python -m moe_dist.prepare_data",
    ),
}


def build_corpus(cfg: DataConfig, seq_len: int, rank: int, world: int, seed: int) -> Any:
    """The corpus of ``cfg.kind``'s row."""
    module, name = DATA_KINDS[cfg.kind].build.split(":")
    return getattr(importlib.import_module(module), name).build(cfg, seq_len, rank, world, seed)
