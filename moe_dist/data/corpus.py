"""Byte-level corpora: the interpreter's standard library (default), a user's text files, or a synthetic
corpus with controllable topic skew.

Every rank holds the whole corpus. Sequence j of step s is a window drawn by its own generator, keyed by
(split, seed, s, j): the step's global batch depends on (seed, step, global batch size) only, never on the
world size, and rank r's micro-batch m takes sequences [(m * world + r) * B, ... + B). So a run resumed at
another world size, with micro_batch * world kept, trains on the same global batches; and the data position
on resume is just the step.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moe_dist.data.config import DataConfig
from moe_dist.data.files import DataError, stdlib_files, text_files


def _read(files: list[Path], root: Path, max_bytes: int) -> bytes:
    chunks, total = [], 0
    for f in files:
        try:
            b = f.read_bytes()  # bytes, not text: any encoding (or none) is fine
        except OSError as e:
            raise DataError(f"cannot read {f}: {e}") from None
        chunks.append(b)
        total += len(b)
        if max_bytes and total >= max_bytes:
            break
    return b"".join(chunks)[: max_bytes or None]


def synthetic_corpus(cfg: DataConfig, n_bytes: int, seed: int) -> bytes:
    """Documents of 64-512 bytes; each from one topic drawn with Zipf(s) probabilities. Topic t emits
    bytes from its own band of 24 printable values, so routing by byte identity is skewed by topic."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, cfg.topics + 1, dtype=torch.float64) ** cfg.zipf_s
    out, total = [], 0
    while total < n_bytes:
        topic = int(torch.multinomial(weights, 1, generator=g))
        length = int(torch.randint(64, 513, (1,), generator=g))
        band = 32 + (topic * 24) % (127 - 32 - 24)
        doc = torch.randint(band, band + 24, (length,), generator=g, dtype=torch.uint8)
        out.append(bytes(doc.tolist()))
        total += length
    return b"".join(out)[:n_bytes]


@dataclass
class Corpus:
    train: Tensor
    """uint8 bytes of the whole training split (every rank holds all of it)."""
    val: Tensor
    """uint8 bytes of the whole validation split."""
    description: str
    world: int = 1
    """Ranks that split each global micro-batch (rank r takes the r-th slice of B sequences)."""
    vocab_size: int = 256
    """Every id is a byte."""
    tokens_per_byte: float = 1.0
    """A token is a byte: bits per byte = val loss / ln 2."""

    @classmethod
    def build(cls, cfg: DataConfig, seq_len: int, rank: int, world: int, seed: int) -> Corpus:
        if cfg.kind == "synthetic":
            size = cfg.max_bytes or 4_000_000
            train_b = synthetic_corpus(cfg, size, seed)
            val_b = synthetic_corpus(cfg, max(size // 10, (seq_len + 1) * 4), seed + 1)
            desc = f"synthetic: {cfg.topics} topics, zipf s={cfg.zipf_s}"
        else:
            root, files = stdlib_files() if cfg.kind == "stdlib" else text_files(cfg.paths)
            files = [f for f in files if f.stat().st_size > 0]  # empty files hold no sequences
            if not files:
                raise DataError(f"the {cfg.kind} corpus has no non-empty files")

            def is_val(f: Path) -> bool:  # a stable per-file split, independent of directory order
                return zlib.crc32(str(f.relative_to(root)).encode()) % cfg.val_every == 0

            val_files = [f for f in files if is_val(f)]
            train_files = [f for f in files if not is_val(f)]
            if not val_files or not train_files:  # tiny corpora: split the one stream instead
                train_files = val_files = files
            train_b = _read(train_files, root, cfg.max_bytes)
            val_b = _read(val_files, root, max(cfg.max_bytes // cfg.val_every, 0))
            if train_files is not val_files and min(len(train_b), len(val_b)) < 2 * (seq_len + 1):
                # a by-file split too small for two sequences on one side: split the one stream
                train_files = val_files = files
                train_b = _read(files, root, cfg.max_bytes)
            desc = f"{cfg.kind}: {len(files)} files ({len(train_files)} train, {len(val_files)} val)"
            if train_files is val_files:
                cut = len(train_b) * 9 // 10
                train_b, val_b = train_b[:cut], train_b[cut:]
        train = _as_tensor(train_b, seq_len, "train")
        val = _as_tensor(val_b, seq_len, "validation")
        desc += f", {len(train_b) / 1e6:.1f} MB train, {len(val_b) / 1e6:.2f} MB val"
        return cls(train, val, desc, world)

    def batch(
        self, split: str, batch: int, seq_len: int, seed: int, rank: int, step: int, micro: int
    ) -> tuple[Tensor, Tensor]:
        """Rank ``rank``'s slice of global micro-batch ``micro`` of ``step``; a pure function of its
        arguments and the world size (resumable)."""
        first = (micro * self.world + rank) * batch
        return self.sequences(split, seq_len, seed, step, range(first, first + batch))

    def sequences(
        self, split: str, seq_len: int, seed: int, step: int, indices: Sequence[int]
    ) -> tuple[Tensor, Tensor]:
        """Sequences ``indices`` of ``step`` (inputs and next-byte targets, [len(indices), seq_len] each)."""
        data = self.train if split == "train" else self.val
        starts = window_starts(split, seed, step, indices, data.numel(), seq_len)
        idx = torch.tensor(starts, dtype=torch.long)[:, None] + torch.arange(seq_len + 1)
        window = data[idx].long()
        return window[:, :-1], window[:, 1:]


def window_starts(
    split: str, seed: int, step: int, indices: Sequence[int], n: int, seq_len: int
) -> list[int]:
    """Where sequences ``indices`` of ``step`` start in a split of ``n`` tokens (every corpus's rule)."""
    starts = []
    for j in indices:
        # why one generator per sequence: sequence j is the same whichever rank and batch it lands in
        g = torch.Generator().manual_seed(zlib.crc32(f"{split}:{seed}:{step}:{j}".encode()))
        starts.append(int(torch.randint(0, n - seq_len - 1, (1,), generator=g)))
    return starts


def _as_tensor(data: bytes, seq_len: int, what: str) -> Tensor:
    if not data:
        raise DataError(f"the {what} corpus is empty")
    if len(data) < 2 * (seq_len + 1):
        raise DataError(
            f"the {what} corpus ({len(data)} bytes) is too small for sequences of {seq_len} bytes "
            f"(it needs >= {2 * (seq_len + 1)} bytes)"
        )
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
