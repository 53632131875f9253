"""Straggler profiler validation on gloo: injected delays, controls, token skew, and the trainer outputs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from profiling.sweep import SweepSpec, run_specs
from profiling.timer import Injection
from tests.distributed import run_ranks
from tests.train_workers import tiny, train_worker

DELAYS = [0.0, 15.0, 30.0, 45.0]


def layer1_straggler(r: dict) -> float:
    return r["layers"][1]["fwd"]["straggler_ms"] + r["layers"][1]["bwd"]["straggler_ms"]


def med(recs: list[dict], f) -> float:
    return statistics.median(f(r) for r in recs)


@pytest.fixture(scope="module")
def delay_runs() -> list[dict]:
    specs = [SweepSpec(tokens=512, steps=9, injection=Injection(d, layer=0, rank=1)) for d in DELAYS]
    specs.append(
        SweepSpec(tokens=512, steps=9, injection=Injection(40.0, layer=0, rank=1, where="before_dispatch"))
    )
    return run_ranks(run_specs, 2, specs, timeout=300)[0]


def test_injected_delay_is_measured_as_wait(delay_runs: list[dict]) -> None:
    """A delay d in rank 1's expert stage of layer 0: rank 0's wait there grows by d (least-squares slope in
    [0.9, 1.1]), rank 1 waits for nobody, the other layer is unchanged, and the combine all-to-all's
    duration skew on rank 0 tells the same story."""
    recs = [r["records"] for r in delay_runs[: len(DELAYS)]]
    w_other = [med(rs, lambda r: r["layers"][0]["fwd"]["W"][0]) for rs in recs]
    mean_d, mean_w = sum(DELAYS) / len(DELAYS), sum(w_other) / len(w_other)
    slope = sum((d - mean_d) * (w - mean_w) for d, w in zip(DELAYS, w_other, strict=True)) / sum(
        (d - mean_d) ** 2 for d in DELAYS
    )
    assert 0.9 <= slope <= 1.1, f"slope {slope:.3f}; waits {w_other}"
    for d, rs in zip(DELAYS[1:], recs[1:], strict=True):
        assert med(rs, lambda r: r["layers"][0]["fwd"]["W"][1]) < 0.5, "the delayed rank must not wait"
        assert med(rs, lambda r: r["layers"][0]["fwd"]["rank"]) == 1
        base = med(
            recs[0], lambda r: r["layers"][1]["fwd"]["straggler_ms"] + r["layers"][1]["bwd"]["straggler_ms"]
        )
        other = med(
            rs, lambda r: r["layers"][1]["fwd"]["straggler_ms"] + r["layers"][1]["bwd"]["straggler_ms"]
        )
        assert abs(other - base) < 0.1 * d + 2.0, f"layer 1 moved {other - base:.1f} ms for d={d}"
        w0 = med(rs, lambda r: r["layers"][0]["fwd"]["W"][0])
        skew = med(rs, lambda r: r["layers"][0]["A_com_skew"][0])
        assert abs(skew - w0) < 0.2 * d + 3.0, f"combine skew {skew:.1f} vs wait {w0:.1f}"


def test_delay_before_dispatch_is_not_expert_straggling(delay_runs: list[dict]) -> None:
    """The control: 40 ms before the dispatch all-to-all shows up as rank 0 waiting inside that all-to-all,
    not as expert straggler time."""
    base, ctrl = delay_runs[0]["records"], delay_runs[-1]["records"]
    s_base = med(base, lambda r: r["layers"][0]["fwd"]["straggler_ms"])
    s_ctrl = med(ctrl, lambda r: r["layers"][0]["fwd"]["straggler_ms"])
    assert s_ctrl < s_base + 4.0, (
        f"pre-dispatch delay leaked into straggler time: {s_base:.1f} -> {s_ctrl:.1f}"
    )
    a_base = med(base, lambda r: r["layers"][0]["A_dis"][0])
    a_ctrl = med(ctrl, lambda r: r["layers"][0]["A_dis"][0])
    assert a_ctrl - a_base > 0.7 * 40.0, "rank 0 should wait ~40 ms in the dispatch all-to-all"


def test_balanced_control_and_token_skew() -> None:
    """Balanced routing keeps S at the noise floor; S rises monotonically with the skew and is mostly
    explained by tokens. The floor of 2 ranks sharing 2 cores with the test process measured 2.6-4.2% of
    the step (CI once saw 5.0%) and 10-13% of S at load 1.5, so the bounds are 10% of the step and a quarter
    of S at load 1.5."""
    loads = [1.0, 1.5, 2.0]
    res = run_ranks(run_specs, 2, [SweepSpec(load=x, tokens=1024, steps=9) for x in loads], timeout=300)[0]
    S = [med(r["records"], lambda rec: rec["straggler_ms"]) for r in res]
    steps = [statistics.median(r["step_ms"]) for r in res]
    assert S[0] < 0.10 * steps[0], f"balanced S {S[0]:.1f} ms of a {steps[0]:.1f} ms step"
    assert S[0] < 0.25 * S[1], f"balanced S {S[0]:.1f} ms is not far below S at load 1.5 ({S[1]:.1f} ms)"
    assert S[0] < S[1] < S[2], f"S not monotone in skew: {S}"
    assert med(res[2]["records"], lambda rec: rec["token_explained_frac"]) > 0.7


def test_trainer_writes_profiler_outputs(tmp_path: Path) -> None:
    cfg = tiny(
        out_dir=str(tmp_path),
        name="p",
        parallel={"ep": 2},
        train={"steps": 6, "log_every": 3},
        profile={"trace": True, "wait": 1, "warmup": 1, "active": 2},
    )
    run_ranks(train_worker, 2, cfg, timeout=300)
    run = tmp_path / "p"
    recs = [json.loads(x) for x in (run / "straggler.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(6))
    for r in recs:
        assert len(r["layers"]) == 2 and len(r["layers"][0]["fwd"]["E"]) == 2
        assert 0 <= r["straggler_ms"] <= r["step_ms"]
    routing = [json.loads(x) for x in (run / "routing.jsonl").read_text().splitlines()]
    assert len(routing) == 6 and len(routing[0]["tokens_per_expert"]) == 2
    traces = sorted(p.name for p in (run / "tb").glob("*.pt.trace.json*"))
    assert len(traces) == 2 and traces[0].endswith(".pt.trace.json"), traces
