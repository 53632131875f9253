"""A run directory as the offline tools read it: its config and JSONL records (no plots, no report)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from profiling.runtime.record import RoutingRecord


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file sorted by step; a step logged twice (a resumed run appends) keeps the last."""
    if not path.exists():
        return []
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


@dataclass
class Run:
    run_dir: Path
    config: dict
    straggler: list[dict]
    """straggler.jsonl records, by step."""
    routing: dict[int, list[list[float]]]
    """step -> per MoE layer, per expert global (token, expert) counts."""
    layers: list[int] = field(default_factory=list)
    """Model layer index of each MoE layer (routing order)."""

    @property
    def world(self) -> int:
        return len(self.straggler[0]["layers"][0]["n"]) if self.straggler else 0

    @property
    def num_experts(self) -> int:
        return int(self.config["model"]["moe"]["num_experts"])

    @property
    def ep(self) -> int:
        return int(self.config["parallel"]["ep"])


class RunDirError(ValueError):
    """The path given is not a run directory the trainer wrote."""


def load_run(run_dir: Path) -> Run:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(
            f"{run_dir} is not a run directory (no config.yaml): pass runs/<name>, the directory the "
            f"trainer wrote"
        )
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    straggler = read_jsonl(run_dir / "straggler.jsonl")
    routing = {
        r["step"]: RoutingRecord.from_jsonl(r).tokens_per_expert
        for r in read_jsonl(run_dir / "routing.jsonl")
    }
    if straggler:
        layers = [e["layer"] for e in straggler[0]["layers"]]
    else:
        first = next(iter(routing.values()), [])
        layers = list(range(len(first)))
    return Run(run_dir, config, straggler, routing, layers)
