"""Straggler profiler validation on gloo: injected delays, controls, token skew, and the trainer outputs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from profiling.bench.sweep import SweepSpec, run_specs_interleaved
from profiling.runtime.timer import Injection
from tests.helpers.launch import run_ranks
from tests.training.train_workers import tiny, train_worker

DELAYS = [0.0, 15.0, 30.0, 45.0]


def layer1_straggler(r: dict) -> float:
    return r["layers"][1]["fwd"]["straggler_ms"] + r["layers"][1]["bwd"]["straggler_ms"]


def med(recs: list[dict], f) -> float:
    return statistics.median(f(r) for r in recs)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


@pytest.fixture(scope="module")
def delay_runs() -> list[dict]:
    specs = [SweepSpec(tokens=512, steps=9, injection=Injection(d, layer=0, rank=1)) for d in DELAYS]
    specs.append(
        SweepSpec(tokens=512, steps=9, injection=Injection(40.0, layer=0, rank=1, where="before_dispatch"))
    )
    # moe.overlap_shared with a shared expert: no delay, the expert delay, the pre-dispatch delay
    specs += [
        SweepSpec(tokens=512, steps=9, shared_d_ff=256, overlap=True, injection=Injection(d, 0, 1, where))
        for d, where in ((0.0, "experts"), (40.0, "experts"), (40.0, "before_dispatch"))
    ]
    # why interleaved: a busy spell of the shared machine then hits every delay alike
    return run_ranks(run_specs_interleaved, 2, specs, timeout=300)[0]


def test_injected_delay_is_measured_as_wait(delay_runs: list[dict]) -> None:
    """A delay d in rank 1's expert stage of layer 0: rank 0's wait there grows by d (least-squares slope
    near 1), rank 1 waits for nobody, the other layer does not grow with d, and the combine all-to-all's
    duration skew on rank 0 grows by d too. Slopes, not per-delay differences: over 40 runs under a load
    average of 7-10 on 2 cores, the wait slope was 0.94-1.08, the skew slope 0.95-1.08 and layer 1's slope
    -0.18-0.20, while layer 1's straggler time moved by up to 10.6 ms at a single delay (noise, the same at
    every d). A delay counted in the wrong layer or not at all moves a slope by 1; bounds 0.15 and 0.4."""
    recs = [r["records"] for r in delay_runs[: len(DELAYS)]]
    w_other = [med(rs, lambda r: r["layers"][0]["fwd"]["W"][0]) for rs in recs]
    assert 0.85 <= slope(DELAYS, w_other) <= 1.15, f"slope {slope(DELAYS, w_other):.3f}; waits {w_other}"
    for rs in recs[1:]:
        assert med(rs, lambda r: r["layers"][0]["fwd"]["W"][1]) < 0.5, "the delayed rank must not wait"
        assert med(rs, lambda r: r["layers"][0]["fwd"]["rank"]) == 1
    layer1 = [med(rs, layer1_straggler) for rs in recs]
    assert abs(slope(DELAYS, layer1)) < 0.4, f"layer 1 straggler ms {layer1} for delays {DELAYS}"
    skew = [med(rs, lambda r: r["layers"][0]["A_com_skew"][0]) for rs in recs]
    assert 0.85 <= slope(DELAYS, skew) <= 1.15, f"combine skew {skew} vs waits {w_other}"


def test_delay_before_dispatch_is_not_expert_straggling(delay_runs: list[dict]) -> None:
    """The control: 40 ms before the dispatch all-to-all shows up as rank 0 waiting inside that all-to-all,
    not as expert straggler time. Over 40 runs under load: straggler time moved by -2.4 to +4.2 ms and the
    dispatch wait grew by 34-51 ms; a leak would add ~40 ms to the first and take it from the second."""
    base, ctrl = delay_runs[0]["records"], delay_runs[len(DELAYS)]["records"]
    s_base = med(base, lambda r: r["layers"][0]["fwd"]["straggler_ms"])
    s_ctrl = med(ctrl, lambda r: r["layers"][0]["fwd"]["straggler_ms"])
    assert s_ctrl < s_base + 0.25 * 40.0, (
        f"pre-dispatch delay leaked into straggler time: {s_base:.1f} -> {s_ctrl:.1f}"
    )
    a_base = med(base, lambda r: r["layers"][0]["A_dis"][0])
    a_ctrl = med(ctrl, lambda r: r["layers"][0]["A_dis"][0])
    assert a_ctrl - a_base > 0.5 * 40.0, "rank 0 should wait ~40 ms in the dispatch all-to-all"


def test_overlap_keeps_expert_time_and_wait_apart(delay_runs: list[dict]) -> None:
    """moe.overlap_shared (the dispatch all-to-all in flight while a shared expert runs): 40 ms in rank 1's
    expert stage still shows as rank 0's wait W and rank 1 as the straggler; 40 ms before rank 1's dispatch
    still shows in rank 0's dispatch time A_dis (now the launch plus the wait after the shared expert, which
    is in neither), not as straggler time. Single differences, not slopes, so bounds of a quarter of the
    delay (the noise of one delay's median was up to 10.6 ms, see above)."""
    base, expert, before = (r["records"] for r in delay_runs[len(DELAYS) + 1 :])
    w = [med(rs, lambda r: r["layers"][0]["fwd"]["W"][0]) for rs in (base, expert)]
    assert abs(w[1] - w[0] - 40.0) < 0.25 * 40.0, f"rank 0 wait {w[0]:.1f} -> {w[1]:.1f} ms for 40 ms"
    assert med(expert, lambda r: r["layers"][0]["fwd"]["rank"]) == 1
    s = [med(rs, lambda r: r["layers"][0]["fwd"]["straggler_ms"]) for rs in (base, before)]
    assert s[1] < s[0] + 0.25 * 40.0, f"pre-dispatch delay leaked into straggler time: {s}"
    a = [med(rs, lambda r: r["layers"][0]["A_dis"][0]) for rs in (base, before)]
    assert a[1] - a[0] > 0.5 * 40.0, f"rank 0 should wait ~40 ms in the dispatch all-to-all: {a}"


def test_balanced_control_and_token_skew() -> None:
    """Balanced routing keeps S at the noise floor; S rises monotonically with the skew and is mostly
    explained by tokens. The loads take turns step by step, so a busy spell of the shared machine hits all
    three alike. Over 40 runs on 2 shared cores (load average 1-10), the balanced S was at most 11.4% of
    its step and at most 0.31 of S at load 2.0, S never fell with the skew, and at load 2.0 the
    token-explained share was at least 0.71. The old bound, a quarter of S at load 1.5, failed in 8 of 20
    runs of the test as it was (S at 1.5 is only ~20 ms on a quiet machine). Bounds: 20% of the step, half
    of S at load 2.0, 0.5 (a profiler that counted the all-to-all as straggling or missed the token skew
    breaks them)."""
    loads = [1.0, 1.5, 2.0]
    specs = [SweepSpec(load=x, tokens=1024, steps=9) for x in loads]
    res = run_ranks(run_specs_interleaved, 2, specs, timeout=300)[0]
    S = [[rec["straggler_ms"] for rec in r["records"]] for r in res]
    # per-step ratios (the three loads of a round ran back to back), then their median
    s0_of_step = statistics.median(s / t for s, t in zip(S[0], res[0]["step_ms"], strict=True))
    s0_of_s2 = statistics.median(a / b for a, b in zip(S[0], S[2], strict=True))
    med_S = [statistics.median(s) for s in S]
    assert s0_of_step < 0.20, f"balanced S is {s0_of_step:.0%} of its step; S per load {med_S}"
    assert s0_of_s2 < 0.5, f"balanced S is {s0_of_s2:.2f} of S at load 2.0; S per load {med_S}"
    assert med_S[0] < med_S[1] < med_S[2], f"S not monotone in skew: {med_S}"
    assert med(res[2]["records"], lambda rec: rec["token_explained_frac"]) > 0.5


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
