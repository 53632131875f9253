"""Checkpoints that survive a change of cluster: layout-independent data and validation, per-expert init,
global (per-expert) checkpoints resumed at another (world, EP), the resume self-check, async save."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from moe_dist.data.config import DataConfig
from moe_dist.data.corpus import Corpus
from moe_dist.errors import ConfigError
from moe_dist.training.config import config_from_dict
from moe_dist.training.preflight import preflight
from tests.checkpoint.reshard_workers import preflighted_run, probed_run
from tests.helpers.launch import deepspeed_cmd, launch, run_ranks
from tests.helpers.shared_runs import SHARED_STEPS, SharedRun, cut_back, write_ds_config
from tests.training.train_workers import tiny, train_worker


def test_global_batch_does_not_depend_on_the_world_size() -> None:
    """micro_batch x world fixed: the ranks' slices of each global micro-batch, concatenated, are the same
    sequences at world 1, 2 and 4 (and so with grad_accum > 1, micro-batch by micro-batch)."""
    cfg = DataConfig(kind="synthetic", max_bytes=50_000)

    def global_batch(world: int, micro: int) -> torch.Tensor:
        parts = []
        for rank in range(world):
            corpus = Corpus.build(cfg, 16, rank, world, 0)
            parts.append(corpus.batch("train", 8 // world, 16, 0, rank, 5, micro)[0])
        return torch.cat(parts)

    for micro in (0, 1):
        want = global_batch(1, micro)
        assert torch.equal(global_batch(2, micro), want) and torch.equal(global_batch(4, micro), want)
    corpus = Corpus.build(cfg, 16, 0, 1, 0)
    assert not torch.equal(
        corpus.batch("train", 8, 16, 0, 0, 5, 0)[0], corpus.batch("train", 8, 16, 0, 0, 6, 0)[0]
    )


# --- resharding -------------------------------------------------------------------------------------
GLOBAL_BATCH = 8  # sequences per step, kept at every world size (micro_batch = GLOBAL_BATCH / world)
SAVED_AT, STEPS = 3, 8


def _cfg(tmp: Path, name: str, world: int, ep: int, steps: int = STEPS) -> dict:
    train = {"steps": steps, "ckpt_every": SAVED_AT, "keep_last": 5, "micro_batch": GLOBAL_BATCH // world}
    return tiny(out_dir=str(tmp), name=name, parallel={"ep": ep}, train=train)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(run) if "loss" in r}


def _merged_moments(results: list[dict]) -> dict:
    out: dict = {}
    for res in results:
        out.update(res["probe"]["moments"])
    return out


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], tuple[Path, list[dict]]]:
    """An 8-step run at world 4 (EP 2 x DP 2) and one at world 2 (EP 2), checkpoints at 3 and 6, probed
    (logits on a fixed batch, each expert's AdamW moments) when the step-3 checkpoint is written."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for world, ep in ((4, 2), (2, 2)):
        name = f"w{world}e{ep}"
        res = run_ranks(probed_run, world, _cfg(root, name, world, ep), "save", SAVED_AT, timeout=400)
        out[(world, ep)] = (root / name, res)
    return out


def _copy_until(src: Path, dst: Path, step: int) -> None:
    """A copy of ``src`` whose newest checkpoint is the one of ``step`` (as if the job had stopped
    after writing it)."""
    shutil.copytree(src, dst)
    cut_back(dst, step)


@pytest.mark.parametrize(
    "saved,target", [((4, 2), (2, 2)), ((4, 2), (4, 4)), ((4, 2), (1, 1)), ((2, 2), (4, 4))]
)
def test_resume_at_another_layout(saved_runs: dict, tmp_path: Path, saved: tuple, target: tuple) -> None:
    """The step-3 checkpoint of a (world, EP) run resumed at another (world, EP), global batch kept: the
    loaded model's logits equal the saved model's, each expert's Adam moments (found by expert id) equal
    the saved ones, the resume self-check passes, and steps 3-7 equal the original run's to 1e-6."""
    src, saved_res = saved_runs[saved]
    world, ep = target
    _copy_until(src, tmp_path / "b", SAVED_AT)
    res = run_ranks(probed_run, world, _cfg(tmp_path, "b", world, ep), "resume", timeout=400)
    want, got = saved_res[0]["probe"], res[0]["probe"]
    assert got["step"] == want["step"] == SAVED_AT
    torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-5, atol=1e-6)
    want_m, got_m = _merged_moments(saved_res), _merged_moments(res)
    assert sorted(got_m) == sorted(want_m) and len(want_m) == 2 * 2 * 4  # layers x (w1, w2) x experts
    for key, (avg, avg_sq, step) in want_m.items():
        assert torch.equal(got_m[key][0], avg) and torch.equal(got_m[key][1], avg_sq), key
        assert got_m[key][2] == step == SAVED_AT
    checks = [r for r in _rows(tmp_path / "b") if "resume_check" in r]
    assert len(checks) == 1 and checks[0]["resume_check"] == "pass", checks
    assert checks[0]["saved_layout"] == list(saved) and checks[0]["layout"] == list(target)
    want_l, got_l = _losses(src), _losses(tmp_path / "b")
    assert sorted(got_l) == list(range(STEPS))
    for step in range(SAVED_AT, STEPS):
        assert got_l[step] == pytest.approx(want_l[step], rel=1e-6), (step, got_l[step], want_l[step])


def test_a_resume_at_a_smaller_world_keeps_the_global_batch(tmp_path: Path) -> None:
    """A world-2 run (micro_batch 4: 8 sequences per step) whose step-2 checkpoint is resumed at world 1
    with the same config: the preflight keeps the stored 8 by deriving grad_accum 2, says so, writes it to
    config.yaml, and steps 2-3 equal the uninterrupted run's. Local balance scope, so that each rank's
    micro-batch pools what each micro-batch pooled before (with global scope a micro-batch would pool half
    the sequences: the same global batch, but a slightly different balance loss). A world that cannot keep
    it (3 does not divide 8) is refused in one line naming both numbers and the override, before any
    process group, with nothing written."""
    steps, saved_at = 4, 2
    cfg = tiny(
        out_dir=str(tmp_path),
        name="a",
        model={"moe": {"balance_scope": "local"}},
        train={"steps": steps, "ckpt_every": saved_at, "keep_last": 5, "micro_batch": 4, "eval_every": 4},
    )
    run_ranks(preflighted_run, 2, cfg, timeout=400)
    src = tmp_path / "a"
    _copy_until(src, tmp_path / "b", saved_at)
    cfg = dict(cfg, name="b")
    before = sorted(p.name for p in (tmp_path / "b").rglob("*"))
    with pytest.raises(ConfigError) as err:
        preflight(config_from_dict(cfg), 3, 0)
    msg = str(err.value)
    assert "\n" not in msg and "is 8 sequences per step" in msg and "= 12" in msg, msg
    assert "train.global_batch=12" in msg, msg
    assert sorted(p.name for p in (tmp_path / "b").rglob("*")) == before
    (res,) = run_ranks(preflighted_run, 1, cfg, timeout=400)
    assert res["batch"] == (4, 2, GLOBAL_BATCH)
    written = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["train"]
    assert (written["micro_batch"], written["grad_accum"], written["global_batch"]) == (4, 2, GLOBAL_BATCH)
    want_l, got_l = _losses(src), _losses(tmp_path / "b")
    assert sorted(got_l) == list(range(steps))
    for step in range(saved_at, steps):
        assert got_l[step] == pytest.approx(want_l[step], rel=1e-6), (step, got_l[step], want_l[step])


@pytest.mark.parametrize("mode", ["error", "warn"])
def test_a_permuted_expert_fails_the_resume_check(saved_runs: dict, tmp_path: Path, mode: str) -> None:
    """Experts 0 and 1 of layer 0 swapped while loading: every rank stops with the self-check's error,
    after logging the failed record; under train.resume_check=warn the same record is logged and the run
    trains on to its last step."""
    src, _ = saved_runs[(2, 2)]
    _copy_until(src, tmp_path / "b", SAVED_AT)
    cfg = _cfg(tmp_path, "b", 2, 1)
    cfg["train"]["resume_check"] = mode
    res = run_ranks(probed_run, 2, cfg, "resume", 0, True, expect_errors=mode == "error")
    if mode == "error":
        for status, msg in res:
            assert status == "error" and msg.startswith("ResumeCheckError: resume self-check failed"), msg
    else:
        assert [r["summary"]["steps"] for r in res] == [STEPS, STEPS]
        assert max(_losses(tmp_path / "b")) == STEPS - 1
    checks = [r for r in _rows(tmp_path / "b") if "resume_check" in r]
    assert [c["resume_check"] for c in checks] == ["fail"] and checks[0]["rel_diff"] > 1e-5


def test_deepspeed_checkpoint_at_another_layout_is_refused_in_one_line(
    ds_zero2_run: SharedRun, tmp_path: Path
) -> None:
    """engine=deepspeed (ZeRO-2) resumed with EP 2 -> 1: every rank prints one line naming DeepSpeed's
    universal-checkpoint conversion and exits 2, before any process group exists. The checkpoint is a
    copy of the session's shared ZeRO-2 run (tests/shared_runs.py)."""
    pytest.importorskip("deepspeed")
    cfg = write_ds_config(tmp_path)
    ds_zero2_run.copy(tmp_path / "d")
    p = launch(deepspeed_cmd(cfg, "d", "parallel.ep=1", f"train.steps={SHARED_STEPS + 2}"), timeout=400)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    lines = [line for line in out.splitlines() if "ConfigError" in line and "[rank " in line]
    assert len(lines) == 2, out[-4000:]
    assert all("world=2, ep=2" in line and "ds_to_universal" in line for line in lines), lines


def test_async_save_commits_every_checkpoint_and_resumes_exactly(tmp_path: Path) -> None:
    """train.async_save: every checkpoint is committed (manifest verifies, ``latest`` at the last step),
    each save's stall is logged, and a resume from an async checkpoint repeats the run bit for bit."""
    from moe_dist.checkpoint.files import verify

    train = {"steps": 6, "ckpt_every": 2, "keep_last": 5, "async_save": True}
    cfg = tiny(out_dir=str(tmp_path), name="a", parallel={"ep": 2}, train=train)
    run_ranks(train_worker, 2, cfg)
    a = tmp_path / "a"
    ckpts = sorted(p.name for p in (a / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step_00000002", "step_00000004", "step_00000006"]
    assert not (a / "checkpoints" / "latest").exists()  # the newest verified step directory is resumed
    for name in ckpts:
        verify(a / "checkpoints" / name)
    stalls = [r for r in _rows(a) if "checkpoint_stall_s" in r]
    assert [r["step"] for r in stalls] == [2, 4, 6] and all(r["async_save"] for r in stalls)
    _copy_until(a, tmp_path / "b", 2)
    run_ranks(train_worker, 2, dict(cfg, name="b"))
    want, got = _losses(a), _losses(tmp_path / "b")
    assert sorted(got) == list(range(6)) and all(got[s] == want[s] for s in range(2, 6)), (got, want)
