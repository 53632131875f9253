"""What watches a run and sums it up: per-step load statistics, the expert-collapse warning, and the
run's summary (summary.json)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from profiling.runtime.record import StepRecord

log = logging.getLogger("moe_dist.train")


def load_stats(counts: torch.Tensor) -> dict[str, float]:
    """MaxVio (max/mean - 1) and the coefficient of variation of per-expert counts (0 for no tokens)."""
    n = counts.double()
    mean = n.mean()
    return {
        "maxvio": float(n.max() / mean - 1) if mean > 0 else 0.0,
        "cv": float(n.std(unbiased=False) / mean) if mean > 0 else 0.0,
    }


@dataclass
class CollapseMonitor:
    """Warn when an expert stays under half the mean load for ``patience`` consecutive steps."""

    patience: int
    rank: int = 0
    streak: dict[tuple[int, int], int] = field(default_factory=dict)
    warned: set[tuple[int, int]] = field(default_factory=set)

    def update(self, step: int, layer: int, counts: list[float]) -> int:
        """``step``: the 0-based index of the step whose counts these are (as in the JSONL files)."""
        mean = sum(counts) / len(counts)
        collapsed = 0
        for e, n in enumerate(counts):
            key = (layer, e)
            self.streak[key] = self.streak.get(key, 0) + 1 if n < 0.5 * mean else 0
            if self.streak[key] >= self.patience:
                collapsed += 1
                if key not in self.warned and self.rank == 0:
                    self.warned.add(key)
                    log.warning(
                        "step %d: expert %d of MoE layer %d has stayed under half the mean load for "
                        "%d steps; the balancing coefficient looks too low",
                        step,
                        e,
                        layer,
                        self.streak[key],
                    )
        return collapsed


def logged_history(run_dir: Path, last_eval: dict) -> tuple[list[StepRecord], dict]:
    """The whole run's step records and its last evaluation, from metrics.jsonl (across resumes: the file
    holds each step once); ``last_eval`` when the file has none."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    history = [StepRecord.from_jsonl(r) for r in rows if StepRecord.is_step_row(r)]
    evals = [r for r in rows if "val_loss" in r]
    return history, (evals[-1] if evals else last_eval)


@dataclass
class RunFacts:
    """What the summary states about the run besides its records."""

    steps: int
    """Steps completed."""
    active_params: int
    flops_per_token: float
    peak_tflops: float
    world: int
    ep: int
    engine: str
    initial_val_loss: float | None
    collapse_warnings: int


def build_summary(
    history: list[StepRecord], last_eval: dict, tokens_per_step: int, n_layers: int, facts: RunFacts
) -> dict[str, Any]:
    """summary.json (without ``preempted`` and ``skipped_steps``, which the loop adds)."""
    timed = history[1:] or history  # the first step includes one-off warm-up costs
    mean_time = sum(r.step_time for r in timed) / max(1, len(timed))
    tflops = tokens_per_step / mean_time * facts.flops_per_token / 1e12 if history else None
    return {
        "steps": facts.steps,
        "final_train_loss": history[-1].loss if history else None,
        "initial_val_loss": facts.initial_val_loss,
        "final_val_loss": last_eval.get("val_loss"),
        "final_val_bpb": last_eval.get("val_bpb"),
        "tokens_per_s": tokens_per_step / mean_time if history else None,
        "mean_maxvio_per_layer": [
            sum(r.layers[i].maxvio for r in history) / max(1, len(history)) for i in range(n_layers)
        ],
        "active_params": facts.active_params,
        "tflops": tflops,
        "mfu": (
            tflops / (facts.peak_tflops * facts.world)
            if tflops is not None and facts.peak_tflops > 0
            else None
        ),
        "collapse_warnings": facts.collapse_warnings,
        "world": facts.world,
        "ep": facts.ep,
        "engine": facts.engine,
    }
