"""The expert placement of a run over time, for the report's heatmaps and its placement section.

Where a run records its placement:

- ``straggler.jsonl``: per step, ``placement_version`` (the run's version after that step: the number of
  rebalances that changed some layer), ``migration_ms`` / ``migration_bytes`` (the rebalance at the end of
  that step, 0 when none) and ``replica_sync_ms`` (only runs with replicas or ``placement: balanced``);
- each checkpoint's ``manifest.json``: ``placements``, every MoE layer's slot table (``Placement.to_dict``)
  by module name, in layer order, each with the version at which that layer last changed.

A rebalance runs at the end of step s, so the placement in effect DURING step s is the version recorded at
the step before (version 0, the config's contiguous placement, before the first). A version's slot tables
are known when some checkpoint was written while it was in effect (or for version 0, from the config);
checkpoints pruned by ``train.keep_last`` may leave a version without its tables, and the report says so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from moe_dist.checkpoint.names import MANIFEST, STEP_GLOB
from moe_dist.moe.placement import Placement
from profiling.runtime.record import PlacementRecord

log = logging.getLogger("moe_dist.report")


@dataclass
class Segment:
    """Consecutive recorded steps under one placement version."""

    version: int
    first_step: int
    last_step: int
    tables: list[Placement] | None
    """Per MoE layer (routing order), the placement; None when no checkpoint stored this version."""
    replica_sync_ms: list[float] = field(default_factory=list)


@dataclass
class Rebalance:
    step: int
    """The step at whose end it ran (the steps after it use ``version``)."""
    version: int
    migration_ms: float
    migration_bytes: int


@dataclass
class PlacementHistory:
    segments: list[Segment]
    rebalances: list[Rebalance]

    def segment_of(self, step: int) -> Segment | None:
        for seg in self.segments:
            if seg.first_step <= step <= seg.last_step:
                return seg
        return None


def stored_tables(run_dir: Path) -> dict[int, list[Placement]]:
    """Run version -> per-layer placements, from every checkpoint manifest of the run."""
    out: dict[int, list[Placement]] = {}
    for manifest in sorted((run_dir / "checkpoints").glob(f"{STEP_GLOB}/{MANIFEST}")):
        try:
            stored = json.loads(manifest.read_text()).get("placements")
            tables = [Placement.from_dict(d) for d in (stored or {}).values()]
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            log.warning("%s: no placements read (%s)", manifest, e)
            continue
        if not tables:
            continue
        out.setdefault(max(p.version for p in tables), tables)
    return out


def initial_tables(config: dict, layers: int) -> list[Placement] | None:
    """Version 0: the config's contiguous placement (with ``parallel.redundant_experts`` replicas)."""
    try:
        par = config["parallel"]
        p = Placement.contiguous(
            int(config["model"]["moe"]["num_experts"]), int(par["ep"]), int(par.get("redundant_experts", 0))
        )
    except (KeyError, TypeError, ValueError):
        return None
    return [p] * layers


def placement_history(run_dir: Path, config: dict, straggler: list[dict], layers: int) -> PlacementHistory:
    """Segments of the recorded steps by the placement in effect, and the rebalances between them. A run
    that recorded no placement fields is one segment of version 0."""
    tables = stored_tables(run_dir)
    tables.setdefault(0, initial_tables(config, layers))  # type: ignore[arg-type]
    segments: list[Segment] = []
    rebalances: list[Rebalance] = []
    version = 0  # in effect during the next step
    for rec in straggler:
        step = int(rec["step"])
        if not segments or segments[-1].version != version:
            segments.append(Segment(version, step, step, tables.get(version)))
        seg = segments[-1]
        seg.last_step = step
        placed = PlacementRecord.from_jsonl(rec, version)
        if PlacementRecord.in_row(rec):
            seg.replica_sync_ms.append(placed.replica_sync_ms)
        after = placed.placement_version
        if after != version or placed.migration_ms > 0:
            rebalances.append(Rebalance(step, after, placed.migration_ms, placed.migration_bytes))
        version = after
    return PlacementHistory(segments, rebalances)


def rank_sets(p: Placement) -> list[frozenset[int]]:
    """Per logical expert, the EP ranks holding a slot of it."""
    held: list[set[int]] = [set() for _ in range(p.num_experts)]
    for r, row in enumerate(p.slot_expert_RL):
        for e in row:
            held[e].add(r)
    return [frozenset(s) for s in held]


def boundaries(p: Placement) -> list[float]:
    """y positions (between expert rows i and i+1) where the ranks holding expert i and i+1 differ: the EP
    rank boundaries of a contiguous placement, wherever neighbours sit apart in a moved one."""
    held = rank_sets(p)
    return [i + 0.5 for i in range(len(held) - 1) if held[i] != held[i + 1]]


def recorded(straggler: list[dict]) -> bool:
    return bool(straggler) and PlacementRecord.in_row(straggler[0])


def md_placement(history: PlacementHistory) -> list[str]:
    """The report's placement section: one row per version in effect, then one per rebalance."""
    rows = [
        "## Placement",
        "",
        "Expert placement versions in effect over the recorded steps (a rebalance at the end of step s "
        "changes the placement from step s + 1). Slot tables come from the checkpoints' manifests.",
        "",
        "| version | steps | replica sync ms / step (mean) | slot tables |",
        "|---|---|---|---|",
    ]
    for seg in history.segments:
        sync = seg.replica_sync_ms
        sync_s = f"{sum(sync) / len(sync):.3f}" if sync else "n/a"
        stored = "stored" if seg.tables is not None else "not stored (no checkpoint while in effect)"
        rows.append(f"| v{seg.version} | {seg.first_step}–{seg.last_step} | {sync_s} | {stored} |")
    rows += [
        "",
        "| rebalance after step | to version | migration ms | migration bytes |",
        "|---|---|---|---|",
    ]
    for rb in history.rebalances:
        rows.append(f"| {rb.step} | v{rb.version} | {rb.migration_ms:.3f} | {rb.migration_bytes} |")
    if not history.rebalances:
        rows.append("| none | | | |")
    return rows + [""]
