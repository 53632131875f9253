"""The data section of the run config (``data.*``): which corpus, and how it is split."""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_dist.data.kinds import DATA_KINDS
from moe_dist.errors import ConfigError
from moe_dist.moe.config import check_positive, check_type


@dataclass
class DataConfig:
    kind: str = "stdlib"
    """"stdlib" (this interpreter's standard-library source, as bytes), "text" (``paths``), "synthetic", or
    "tokens" (``path``: a directory written by ``python -m moe_dist.prepare_data``); rows of
    moe_dist/data/kinds.py's ``DATA_KINDS``."""
    paths: list[str] = field(default_factory=list)
    """Files or globs for kind=text."""
    path: str = ""
    """kind=tokens: the prepared directory (manifest.json, train.bin, val.bin), read through a memory map."""
    val_every: int = 20
    """Every val_every-th file (in sorted order, by a stable hash) goes to validation."""
    max_bytes: int = 0
    """Cap on the corpus size in bytes (0 = no cap); keeps start-up fast on big corpora."""
    topics: int = 16
    """Synthetic: number of topics, each its own byte distribution."""
    zipf_s: float = 1.2
    """Synthetic: topic t is drawn with probability proportional to 1 / (t+1)^zipf_s (0 = uniform)."""

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ConfigError(f"data.kind must be one of {', '.join(DATA_KINDS)}, got {self.kind!r}")
        check_type("data", "paths", self.paths, (list,))
        check_type("data", "path", self.path, (str,))
        needs = DATA_KINDS[self.kind].needs
        if needs is not None and not getattr(self, needs):
            raise ConfigError(f"data.kind={self.kind} needs data.{needs} ({DATA_KINDS[self.kind].help})")
        for name in ("val_every", "topics"):
            check_type("data", name, getattr(self, name), (int,))
        if self.val_every < 2:
            raise ConfigError(f"data.val_every must be >= 2, got {self.val_every}")
        check_positive("data", self, "topics")
        check_positive("data", self, "max_bytes", "zipf_s", allow_zero=True)
