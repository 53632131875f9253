"""``data.kind: tokens``: windows of a prepared token directory (moe_dist/data/token_files.py), read through a
memory map. No rank copies the corpus into memory: a window is a slice of the map, copied when it is drawn,
and the pages it touched are the OS's file cache, shared by every rank on the node.

The windows follow corpus.py's rule (``window_starts``): the global batch depends on (seed, step, global batch
size) only, and the data position on resume is the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moe_dist.data.config import DataConfig
from moe_dist.data.corpus import window_starts
from moe_dist.data.kinds import check_split_size
from moe_dist.data.token_files import SPLITS, read_manifest, split_file


@dataclass
class TokenCorpus:
    splits: dict[str, np.memmap]
    """Each split's token ids, mapped read-only."""
    description: str
    vocab_size: int
    tokens_per_byte: float
    """Tokens per byte of text in the validation split (bits per byte = val loss x this / ln 2)."""
    world: int = 1

    @classmethod
    def build(cls, cfg: DataConfig, seq_len: int, rank: int, world: int, seed: int) -> TokenCorpus:
        manifest = read_manifest(cfg.path)
        dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        splits: dict[str, np.memmap] = {}
        for split in SPLITS:
            n = manifest["splits"][split]["tokens"]
            check_split_size(cfg.path, split, n, seq_len)
            splits[split] = np.memmap(Path(cfg.path) / split_file(split), dtype=dtype, mode="r", shape=(n,))
        val = manifest["splits"]["val"]
        tok = manifest["tokenizer"]
        desc = (
            f"tokens: {cfg.path} ({tok['name']}, vocab {tok['vocab_size']}, {manifest['dtype']}), "
            f"{len(splits['train']) / 1e6:.2f}M train / {len(splits['val']) / 1e6:.3f}M val tokens, "
            f"{val['tokens'] / val['bytes']:.3f} tokens per byte"
        )
        return cls(splits, desc, int(tok["vocab_size"]), val["tokens"] / val["bytes"], world)

    def batch(
        self, split: str, batch: int, seq_len: int, seed: int, rank: int, step: int, micro: int
    ) -> tuple[Tensor, Tensor]:
        """Rank ``rank``'s slice of global micro-batch ``micro`` of ``step`` (as ``Corpus.batch``)."""
        first = (micro * self.world + rank) * batch
        return self.sequences(split, seq_len, seed, step, range(first, first + batch))

    def sequences(
        self, split: str, seq_len: int, seed: int, step: int, indices: Sequence[int]
    ) -> tuple[Tensor, Tensor]:
        """Sequences ``indices`` of ``step``: inputs and next-token targets, [len(indices), seq_len] each."""
        data = self.splits["train" if split == "train" else "val"]
        starts = window_starts(split, seed, step, indices, len(data), seq_len)
        window = torch.from_numpy(np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int64))
        return window[:, :-1], window[:, 1:]
