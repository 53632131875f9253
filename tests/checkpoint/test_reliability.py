"""Reliability: a killed rank under torchrun --max-restarts, SIGTERM preemption, config fuzzing, ranks
that disagree on the config, and NaN guards."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_dist.errors import ConfigError
from moe_dist.training.config import config_from_dict, load_config
from tests.helpers.launch import run_ranks, start, torchrun_cmd
from tests.training.train_workers import tiny


def _steps(run: Path) -> dict[int, dict]:
    """The last record of each training step (a restarted run repeats the steps after its checkpoint)."""
    out: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec
    return out


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the job ended early: {_tail(proc)}")
        path = run / "metrics.jsonl"
        if path.exists() and any(s >= step for s in _steps(run)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"step {step} never came")


def _workers(proc: subprocess.Popen) -> list[psutil.Process]:
    return [
        c
        for c in psutil.Process(proc.pid).children(recursive=True)
        if "moe_dist.train" in " ".join(c.cmdline())
    ]


def _torchrun(cfg: Path, name: str, *extra: str) -> subprocess.Popen:
    return start(torchrun_cmd(cfg, name, *extra), cfg.parent / f"{name}.log")


def _tail(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()[-3000:]  # type: ignore[attr-defined]


def test_killed_rank_restarts_and_matches_uninterrupted(tmp_path: Path) -> None:
    """SIGKILL one worker after step 60 (checkpoints every 5); torchrun restarts the group, which resumes
    from the last complete checkpoint and finishes. Every step's loss equals the uninterrupted run's,
    bit for bit."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            tiny(
                out_dir=str(tmp_path),
                parallel={"ep": 2},
                train={"steps": 150, "ckpt_every": 5, "eval_every": 1000},
            )
        )
    )
    ref = _torchrun(cfg, "ref")
    assert ref.wait(timeout=300) == 0, _tail(ref)
    job = _torchrun(cfg, "killed", "--max-restarts", "1")
    try:
        _wait_for_step(tmp_path / "killed", 60, job)
        victims = _workers(job)
        assert len(victims) == 2
        victims[1].send_signal(signal.SIGKILL)
        assert job.wait(timeout=150) == 0, _tail(job)
    finally:
        if job.poll() is None:
            job.kill()
    got, want = _steps(tmp_path / "killed"), _steps(tmp_path / "ref")
    assert sorted(got) == sorted(want) == list(range(150))
    for step in want:
        assert got[step]["loss"] == want[step]["loss"], step
        assert got[step]["tokens_per_expert"] == want[step]["tokens_per_expert"], step
    assert "resumed from" in job.log_path.read_text()  # type: ignore[attr-defined]


def test_sigterm_saves_and_exits_cleanly(tmp_path: Path) -> None:
    """SIGTERM to one worker: every rank finishes the step, a final checkpoint is written, exit code 0."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            tiny(out_dir=str(tmp_path), parallel={"ep": 2}, train={"steps": 100000, "eval_every": 100000})
        )
    )
    job = _torchrun(cfg, "pre")
    try:
        _wait_for_step(tmp_path / "pre", 3, job)
        _workers(job)[0].send_signal(signal.SIGTERM)
        assert job.wait(timeout=120) == 0, _tail(job)
    finally:
        if job.poll() is None:
            job.kill()
    run = tmp_path / "pre"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["preempted"] is True and 3 < summary["steps"] < 100000
    assert max(p.name for p in (run / "checkpoints").iterdir()) == f"step_{summary['steps']:08d}"
    manifest = json.loads(
        (run / "checkpoints" / f"step_{summary['steps']:08d}" / "manifest.json").read_text()
    )
    assert set(manifest["files"]) == {"dense.pt", "experts_ep0.pt", "experts_ep1.pt", "rank0.pt", "rank1.pt"}


def _config_digest_worker(rank: int, world: int) -> None:
    from moe_dist.train import check_same_config

    check_same_config(load_config(None, [f"train.seed={0 if rank < 2 else 7}"]))


def test_ranks_with_different_configs_are_named() -> None:
    res = run_ranks(_config_digest_worker, 3, expect_errors=True, timeout=120)
    for status, msg in res:
        assert status == "error" and "ConfigError" in msg and "ranks [0, 1]" in msg and "ranks [2]" in msg


def _nan_worker(rank: int, world: int, cfg: dict) -> dict:
    import torch

    from moe_dist.moe.parallel import ParallelLayout
    from moe_dist.training.trainer import Trainer

    layout = ParallelLayout.build(2)
    trainer = Trainer(config_from_dict(cfg), layout, torch.device("cpu"))
    if rank == 1:  # poison one rank's token embedding row for every byte: its router logits turn NaN
        with torch.no_grad():
            trainer.model.pos.weight[3, 0] = float("nan")
    return trainer.train()


def test_nan_logits_raise_or_skip(tmp_path: Path) -> None:
    cfg = tiny(out_dir=str(tmp_path), name="n", parallel={"ep": 2}, train={"steps": 3})
    res = run_ranks(_nan_worker, 2, cfg, expect_errors=True)
    for status, msg in res:
        assert status == "error" and "NonFiniteError" in msg and "MoE layer 0" in msg
    cfg["train"] = {**cfg["train"], "on_nonfinite": "skip"}
    cfg["name"] = "s"
    res = run_ranks(_nan_worker, 2, cfg)
    assert res[0]["skipped_steps"] == 3 and res[0]["steps"] == 3


def _state(trainer) -> list:
    """Everything a step may change: weights and buffers (the expert bias too), AdamW state, scheduler."""
    import copy

    return [
        {k: v.clone() for k, v in trainer.model.state_dict().items()},
        copy.deepcopy(trainer.engine.optimizer.state_dict()),
        dict(trainer.engine.scheduler.state_dict()),
    ]


def _same(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def _nan_grad_worker(rank: int, world: int, cfg: dict) -> dict:
    """``optim.lr=1e6 optim.grad_clip=0`` blows the grad norm up to NaN after a step or two. First under
    ``raise`` (caught: every rank must raise, naming the step), then under ``skip``: each step skipped for
    its grad norm must leave every weight, buffer, AdamW moment and the scheduler exactly as they were."""
    import torch

    from moe_dist.errors import NonFiniteError
    from moe_dist.moe.parallel import ParallelLayout
    from moe_dist.training.trainer import Trainer

    layout = ParallelLayout.build(cfg["parallel"]["ep"])
    out: dict = {"raised": None}
    try:
        Trainer(config_from_dict(dict(cfg, name="raise")), layout, torch.device("cpu")).train()
    except NonFiniteError as e:
        out["raised"] = str(e)
    trainer = Trainer(
        config_from_dict(dict(cfg, name="skip", train={**cfg["train"], "on_nonfinite": "skip"})),
        layout,
        torch.device("cpu"),
    )
    step_fn = trainer.train_step
    out["norm_skips"], out["unchanged"] = 0, []

    def watched() -> dict:
        before = _state(trainer)
        record = step_fn()
        if "gradient norm" in getattr(record, "reason", ""):
            out["norm_skips"] += 1
            out["unchanged"].append(_same(before, _state(trainer)))
        return record

    trainer.train_step = watched
    out["summary"] = trainer.train()
    out["finite_weights"] = all(
        bool(torch.isfinite(v).all()) for v in trainer.model.state_dict().values() if v.is_floating_point()
    )
    return out


@pytest.mark.parametrize("engine", ["torch", "fsdp"])
def test_nonfinite_grad_norm_raises_or_skips_without_any_update(tmp_path: Path, engine: str) -> None:
    """A NaN grad norm (found by the norm's own all-reduce, on every rank alike): ``raise`` stops every
    rank with NonFiniteError naming the step; ``skip`` updates nothing (weights, expert bias, AdamW
    moments and step count, scheduler), counts the step in skipped_steps and saves finite weights. Under
    engine torch and engine fsdp (sharded grads and AdamW state)."""
    cfg = tiny(
        engine=engine,
        out_dir=str(tmp_path),
        parallel={"ep": 2},
        model={"moe": {"bias_update_rate": 1e-3}},
        train={"steps": 4, "eval_every": 4},
        optim={"lr": 1e6, "grad_clip": 0.0},
    )
    res = run_ranks(_nan_grad_worker, 2, cfg)
    for r in res:
        assert r["raised"] is not None and "the gradient norm is nan" in r["raised"], r["raised"]
    assert res[0]["raised"] == res[1]["raised"] and "step " in res[0]["raised"]
    for r in res:
        assert r["norm_skips"] >= 1 and all(r["unchanged"]), r
        assert r["summary"]["skipped_steps"] >= r["norm_skips"] and r["finite_weights"]


@pytest.mark.parametrize("mode", ["error", "warn"])
def test_resume_check_names_a_nonfinite_stored_val_loss(
    mode: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint whose stored val loss is NaN: the self-check says so, not "not restored as written"."""
    from types import SimpleNamespace

    from moe_dist.training.checkpointing import CheckpointManager, ResumeCheckError

    records: list = []
    fake = SimpleNamespace(
        cfg=SimpleNamespace(train=SimpleNamespace(resume_check=mode)),
        evaluate=lambda n: {"val_loss": 5.5},
        metrics=SimpleNamespace(log=lambda step, rec, scalars: records.append(rec)),
        step=6,
        rank=0,
        world=1,
        layout=SimpleNamespace(ep=1),
    )
    saved = {"val_loss": float("nan"), "val_sequences": 4}
    manifest = {"world": 1, "ep": 1}
    if mode == "error":
        with pytest.raises(ResumeCheckError) as err:
            CheckpointManager._resume_check(fake, tmp_path / "step_00000006", manifest, saved, fake.step)
        msg = str(err.value)
    else:
        with caplog.at_level("WARNING"):
            CheckpointManager._resume_check(fake, tmp_path / "step_00000006", manifest, saved, fake.step)
        msg = caplog.text
    assert "stored in" in msg and "nan (non-finite)" in msg and "not restored as written" not in msg
    assert records[-1]["resume_check"] == "unchecked"


# --- config fuzzing -------------------------------------------------------------------------------
INT_FIELDS = [
    "model.d_model",
    "model.n_layers",
    "model.n_heads",
    "model.seq_len",
    "model.moe_every",
    "model.moe.num_experts",
    "model.moe.top_k",
    "model.moe.d_ff",
    "train.micro_batch",
    "train.grad_accum",
    "parallel.ep",
    "train.keep_last",
    "data.val_every",
]
FLOAT_FIELDS = [
    "optim.lr",
    "model.moe.aux_loss_coef",
    "model.moe.z_loss_coef",
    "model.moe.cv_importance_coef",
    "model.moe.bias_update_rate",
    "model.moe.capacity_factor",
    "parallel.timeout_s",
    "optim.weight_decay",
    "optim.beta1",
    "optim.grad_clip",
]
ENUM_FIELDS = {
    "model.moe.score_func": ["softmax", "sigmoid", "exp"],
    "engine": ["torch", "deepspeed", "fsdp"],
    "model.moe.balance_scope": ["global", "local", "global_batch"],
    "data.kind": ["stdlib", "text", "synthetic", "tokens"],
    "parallel.backend": ["auto", "gloo", "nccl"],
    "train.on_nonfinite": ["raise", "skip"],
}


def _int_fields(tp=None, where: str = "") -> list[str]:
    """Every field of the config tree annotated int (or int | None), found by walking the dataclasses."""
    import dataclasses
    import typing

    from moe_dist.training.config import RunConfig

    out = []
    for f in dataclasses.fields(tp or RunConfig):
        hint = typing.get_type_hints(tp or RunConfig)[f.name]
        path = f"{where}{f.name}"
        if dataclasses.is_dataclass(hint):
            out += _int_fields(hint, path + ".")
        elif hint is int or (
            typing.get_origin(hint) is not None and typing.get_args(hint) == (int, type(None))
        ):
            out.append(path)
    return out


ALL_INT_FIELDS = _int_fields()
BAD_NAMES = ["", ".", "..", "/abs", "a/b", "../up", "/"]
BOOL_FIELDS = [
    "model.moe.normalize_topk",
    "train.resume",
    "profile.enabled",
    "model.moe.noisy_gating",
    "fsdp.reshard_after_forward",
]

not_number = st.one_of(st.text(max_size=5), st.none(), st.booleans(), st.lists(st.integers(), max_size=2))
bad_int = st.one_of(
    st.integers(max_value=0),
    not_number,
    st.floats(allow_nan=True).filter(lambda f: f != int(f) if math.isfinite(f) else True),
)
bad_float = st.one_of(
    st.floats(max_value=-1e-9, allow_nan=False),
    st.just(float("nan")),
    st.just(float("inf")),
    st.text(max_size=5),
    st.booleans(),
)
bad_config = st.one_of(
    st.tuples(st.sampled_from(INT_FIELDS), bad_int),
    # train.steps may be 0 (a conversion run: load, evaluate, save step 0), never negative
    st.tuples(st.just("train.steps"), st.one_of(st.integers(max_value=-1), not_number)),
    st.tuples(st.sampled_from(FLOAT_FIELDS), bad_float),
    st.sampled_from(sorted(ENUM_FIELDS)).flatmap(
        lambda k: st.tuples(st.just(k), st.text(max_size=8).filter(lambda v: v not in ENUM_FIELDS[k]))
    ),
    st.tuples(st.sampled_from(BOOL_FIELDS), st.one_of(st.integers(), st.text(max_size=3), st.none())),
    st.tuples(
        st.sampled_from(["model.moe", "train", "", "optim", "profile"]),
        st.from_regex(r"[a-z_]{3,12}", fullmatch=True).map(lambda s: "zz" + s),
    ),  # unknown keys
    st.tuples(st.just("model.moe.top_k"), st.integers(9, 64)),  # top_k > num_experts (8)
    st.tuples(st.just("model.n_heads"), st.sampled_from([3, 5, 7, 48])),  # does not divide d_model 128
    # any integer field, zero-allowed ones too (data.max_bytes), refuses a float: 2.5, and 2e4 as well
    st.tuples(st.sampled_from(ALL_INT_FIELDS), st.floats(allow_nan=True, allow_infinity=True)),
    st.tuples(st.just("name"), st.sampled_from(BAD_NAMES)),  # the run directory must stay inside out_dir
)


FUZZED = {"n": 0}


def _set(data: dict, dotted: str, value) -> dict:
    node = data
    parts = dotted.split(".") if dotted else []
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    if (
        isinstance(value, str)
        and value.startswith("zz")
        and dotted in ("", "model.moe", "train", "optim", "profile")
    ):
        node = node.setdefault(parts[-1], {}) if parts else node
        node[value] = 1
    else:
        node[parts[-1]] = value
    return data


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad_config)
def test_fuzzed_bad_configs_give_config_error(bad: tuple) -> None:
    """Every generated bad config gives a ConfigError (never another exception, never a hang)."""
    FUZZED["n"] += 1
    key, value = bad
    data = _set({"model": {"moe": {"num_experts": 8}}}, key, value)
    with pytest.raises(ConfigError):
        config_from_dict(data)


def test_int_fields_were_found() -> None:
    """The walk finds the integer fields of every section, so the float strategy covers them all."""
    assert {"data.max_bytes", "train.grad_accum", "model.moe.shared_d_ff", "parallel.ep"} <= set(
        ALL_INT_FIELDS
    )


def test_fuzzer_ran_at_least_200_examples() -> None:
    assert FUZZED["n"] >= 200, FUZZED
