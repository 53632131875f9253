"""The typed step records write exactly the JSONL keys (and key order) the trainer has always written,
and read such rows back by attribute."""

from __future__ import annotations

from profiling.runtime.record import (
    LayerLoad,
    PlacementRecord,
    RoutingRecord,
    SkippedStep,
    StepExtras,
    StepRecord,
)

# a metrics.jsonl step row as written before the records (two MoE layers, auto coefficients, MFU)
ROW = {
    "loss": 5.25,
    "aux_loss": 0.03,
    "lr": 1e-3,
    "grad_norm": 0.7,
    "step_time": 0.2,
    "tokens_per_s": 640.0,
    "aux/lbl": 0.02,
    "aux/z": 0.01,
    "aux/alpha/L0": 0.011,
    "aux/alpha/L1": 0.012,
    "load/L0/maxvio": 0.5,
    "load/L0/maxvio_local": 0.75,
    "load/L0/cv": 0.25,
    "load/L0/dropped": 0,
    "load/L0/collapsed": 1,
    "load/L1/maxvio": 0.125,
    "load/L1/maxvio_local": 0.375,
    "load/L1/cv": 0.0625,
    "load/L1/dropped": 3,
    "load/L1/collapsed": 0,
    "maxvio_mean": 0.3125,
    "tflops": 0.004,
    "mfu": 0.02,
    "tokens_per_expert": [[3, 5], [4, 4]],
}


def test_step_record_round_trips_the_row_with_its_key_order() -> None:
    rec = StepRecord.from_jsonl(ROW)
    assert rec.layers[1] == LayerLoad(0.125, 0.375, 0.0625, 3, 0)
    assert rec.alphas == [0.011, 0.012] and rec.aux_terms == {"lbl": 0.02, "z": 0.01} and rec.mfu == 0.02
    assert list(rec.to_jsonl().items()) == list(ROW.items())
    assert rec.scalars() == {k: v for k, v in ROW.items() if k != "tokens_per_expert"}
    no_mfu = {k: v for k, v in ROW.items() if k != "mfu"}
    assert list(StepRecord.from_jsonl(no_mfu).to_jsonl()) == list(no_mfu)
    assert StepRecord.is_step_row(ROW) and not StepRecord.is_step_row(SkippedStep("x", 0.1).to_jsonl())


def test_skipped_routing_and_straggler_rows_keep_their_keys() -> None:
    assert SkippedStep("step 3: the gradient norm is nan", 0.5).to_jsonl() == {
        "skipped": True,
        "reason": "step 3: the gradient norm is nan",
        "step_time": 0.5,
    }
    assert RoutingRecord([[1, 2]]).to_jsonl() == {"tokens_per_expert": [[1, 2]]}
    moved = RoutingRecord([[1, 2]], [[[0.5, 1.0], [0.5, 1.0]]], 4)
    assert list(moved.to_jsonl()) == ["tokens_per_expert", "tokens_per_expert_RN", "rebalance_window_steps"]
    assert RoutingRecord.from_jsonl(moved.to_jsonl()) == moved
    extras = StepExtras([0, 2], [10.0, 30.0], PlacementRecord(1.5, 2, 3.0, 4096))
    row = extras.to_jsonl()
    assert list(row) == [
        "dropped",
        "capacity_padding",
        "replica_sync_ms",
        "placement_version",
        "migration_ms",
        "migration_bytes",
    ]
    assert StepExtras.from_jsonl(row) == extras
    assert StepExtras([1]).to_jsonl() == {"dropped": [1]}
    assert PlacementRecord.from_jsonl({"dropped": [1]}, version=3).placement_version == 3
