"""The typed step records: what one training step writes to the run directory's JSONL files.

The trainer builds them, the straggler profiler and the metrics logger write them, and the offline report
and what-if read rows back through them, all by attribute. ``to_jsonl`` gives exactly the keys the files
have always had (the formats are kept); ``from_jsonl`` reads such a row back.

What ``step`` means in each file is stated in ``moe_dist.training.metrics`` (the legend): a step record's
``step`` is the 0-based index of the step it describes.

This module sits in ``profiling.runtime`` (which imports only the library) so that training and the
profiler can both import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerLoad:
    """One MoE layer's load in one step (metrics.jsonl ``load/L{i}/...``)."""

    maxvio: float
    """max/mean - 1 of the step's global per-expert counts."""
    maxvio_local: float
    """The same per micro-batch on each rank alone, averaged over micro-batches and ranks."""
    cv: float
    """Coefficient of variation of the global per-expert counts."""
    dropped: int
    """Token-expert pairs this rank dropped at capacity."""
    collapsed: int
    """Experts under half the mean load for ``train.collapse_patience`` steps in a row."""


@dataclass
class StepRecord:
    """One optimizer step as metrics.jsonl (and TensorBoard) hold it."""

    loss: float
    aux_loss: float
    lr: float
    grad_norm: float
    step_time: float
    tokens_per_s: float
    layers: list[LayerLoad]
    maxvio_mean: float
    tflops: float
    tokens_per_expert: list[list[int]]
    aux_terms: dict[str, float] = field(default_factory=dict)
    """Each balancing term summed over layers, mean over micro-batches (``aux/{name}``)."""
    alphas: list[float] = field(default_factory=list)
    """``aux_loss_coef: auto``: each layer's coefficient after the step (``aux/alpha/L{i}``)."""
    mfu: float | None = None
    """Only with ``train.peak_tflops`` > 0."""
    skipped = False

    def scalars(self) -> dict[str, float]:
        """The TensorBoard scalars: every number of the row."""
        return {k: v for k, v in self.to_jsonl().items() if isinstance(v, int | float)}

    def to_jsonl(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "loss": self.loss,
            "aux_loss": self.aux_loss,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "step_time": self.step_time,
            "tokens_per_s": self.tokens_per_s,
        }
        row.update({f"aux/{k}": v for k, v in self.aux_terms.items()})
        row.update({f"aux/alpha/L{i}": a for i, a in enumerate(self.alphas)})
        for i, ld in enumerate(self.layers):
            row[f"load/L{i}/maxvio"] = ld.maxvio
            row[f"load/L{i}/maxvio_local"] = ld.maxvio_local
            row[f"load/L{i}/cv"] = ld.cv
            row[f"load/L{i}/dropped"] = ld.dropped
            row[f"load/L{i}/collapsed"] = ld.collapsed
        row["maxvio_mean"] = self.maxvio_mean
        row["tflops"] = self.tflops
        if self.mfu is not None:
            row["mfu"] = self.mfu
        row["tokens_per_expert"] = self.tokens_per_expert
        return row

    @classmethod
    def from_jsonl(cls, row: dict[str, Any]) -> StepRecord:
        n = sum(1 for k in row if k.startswith("load/L") and k.endswith("/maxvio"))
        layers = [
            LayerLoad(
                row[f"load/L{i}/maxvio"],
                row[f"load/L{i}/maxvio_local"],
                row[f"load/L{i}/cv"],
                row[f"load/L{i}/dropped"],
                row[f"load/L{i}/collapsed"],
            )
            for i in range(n)
        ]
        alphas = [row[f"aux/alpha/L{i}"] for i in range(n) if f"aux/alpha/L{i}" in row]
        terms = {k[4:]: v for k, v in row.items() if k.startswith("aux/") and not k.startswith("aux/alpha/")}
        return cls(
            loss=row["loss"],
            aux_loss=row["aux_loss"],
            lr=row["lr"],
            grad_norm=row["grad_norm"],
            step_time=row["step_time"],
            tokens_per_s=row["tokens_per_s"],
            layers=layers,
            maxvio_mean=row["maxvio_mean"],
            tflops=row["tflops"],
            tokens_per_expert=row.get("tokens_per_expert", []),
            aux_terms=terms,
            alphas=alphas,
            mfu=row.get("mfu"),
        )

    @staticmethod
    def is_step_row(row: dict[str, Any]) -> bool:
        """Whether a metrics.jsonl row is a completed (not skipped) step's record."""
        return "loss" in row and not row.get("skipped")


@dataclass
class SkippedStep:
    """A step dropped under ``train.on_nonfinite: skip`` (metrics.jsonl)."""

    reason: str
    step_time: float
    skipped = True

    def to_jsonl(self) -> dict[str, Any]:
        return {"skipped": True, "reason": self.reason, "step_time": self.step_time}

    def scalars(self) -> dict[str, float]:
        return {"skipped": 1.0}


@dataclass
class RoutingRecord:
    """One step's routing counts (routing.jsonl), read by the what-if."""

    tokens_per_expert: list[list[int]]
    """Per MoE layer, the step's global count of each expert."""
    tokens_per_expert_RN: list | None = None
    """At a rebalance: the window's mean per-sender counts, per layer [R][N]."""
    rebalance_window_steps: int | None = None

    def to_jsonl(self) -> dict[str, Any]:
        row: dict[str, Any] = {"tokens_per_expert": self.tokens_per_expert}
        if self.tokens_per_expert_RN is not None:
            row.update(
                tokens_per_expert_RN=self.tokens_per_expert_RN,
                rebalance_window_steps=self.rebalance_window_steps,
            )
        return row

    @classmethod
    def from_jsonl(cls, row: dict[str, Any]) -> RoutingRecord:
        return cls(
            row["tokens_per_expert"], row.get("tokens_per_expert_RN"), row.get("rebalance_window_steps")
        )


@dataclass
class PlacementRecord:
    """Where the step's experts sat (straggler.jsonl; runs with replicas or ``placement: balanced``)."""

    replica_sync_ms: float = 0.0
    """Time spent summing replicated experts' gradients."""
    placement_version: int = 0
    """The run's placement version after the step (rebalances that changed some layer)."""
    migration_ms: float = 0.0
    """The rebalance at the end of the step (0 when none)."""
    migration_bytes: int = 0

    def to_jsonl(self) -> dict[str, Any]:
        return {
            "replica_sync_ms": self.replica_sync_ms,
            "placement_version": self.placement_version,
            "migration_ms": self.migration_ms,
            "migration_bytes": self.migration_bytes,
        }

    @staticmethod
    def in_row(row: dict[str, Any]) -> bool:
        """Whether a straggler.jsonl row carries placement fields."""
        return "placement_version" in row

    @classmethod
    def from_jsonl(cls, row: dict[str, Any], version: int = 0) -> PlacementRecord:
        """A row's fields; a row without them reads as no sync, no move, ``version`` unchanged."""
        return cls(
            float(row.get("replica_sync_ms", 0.0)),
            int(row.get("placement_version", version)),
            float(row.get("migration_ms", 0.0)),
            int(row.get("migration_bytes", 0)),
        )


@dataclass
class WireCount:
    """Per MoE layer, what this rank's dispatch all-to-all sent to other ranks in one step (``MoEStats``'
    ``wire_rows`` / ``wire_bytes`` summed over the step's micro-batches): the configured ``moe.dispatch``'s
    own count, rows and (dedup) pair lists; the combine sends the rows back, the backward both again."""

    rows: list[int]
    bytes: list[int]

    @classmethod
    def zeros(cls, layers: int) -> WireCount:
        return cls([0] * layers, [0] * layers)

    def add(self, moe_outs: Any) -> None:
        """Add one forward's layer outputs (``MoEOutput`` per MoE layer, in order)."""
        for i, out in enumerate(moe_outs):
            self.rows[i] += int(out.stats.wire_rows)
            self.bytes[i] += int(out.stats.wire_bytes)


@dataclass
class StepExtras:
    """What the trainer adds to the profiler's straggler.jsonl row of a step."""

    dropped: list[int]
    """Per MoE layer, token-expert pairs dropped at capacity on this rank."""
    capacity_padding: list[float] | None = None
    """Capacity mode: rows a fixed-capacity buffer would carry beyond the kept tokens, per layer."""
    placement: PlacementRecord | None = None
    wire: WireCount | None = None
    """The measured dispatch all-to-all per layer: this rank's from the trainer; in straggler.jsonl
    (``wire_rows`` / ``wire_bytes``, absent in older runs) summed over the ranks by the profiler's gather."""

    @classmethod
    def from_jsonl(cls, row: dict[str, Any]) -> StepExtras:
        """A straggler.jsonl row's trainer fields."""
        placed = PlacementRecord.from_jsonl(row) if PlacementRecord.in_row(row) else None
        wire = WireCount(row["wire_rows"], row["wire_bytes"]) if "wire_bytes" in row else None
        return cls(row.get("dropped", []), row.get("capacity_padding"), placed, wire)

    def to_jsonl(self) -> dict[str, Any]:
        row: dict[str, Any] = {"dropped": self.dropped}
        if self.capacity_padding is not None:
            row["capacity_padding"] = self.capacity_padding
        if self.placement is not None:
            row.update(self.placement.to_jsonl())
        if self.wire is not None:
            row.update(wire_rows=self.wire.rows, wire_bytes=self.wire.bytes)
        return row
