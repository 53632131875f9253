"""Training system: grad sync vs a single-process fp64 model, launches, learning, resume, config errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from moe_dist.checkpoint.files import checkpoint_dirs
from moe_dist.errors import ConfigError
from moe_dist.models.transformer import MoETransformer
from moe_dist.training.config import config_from_dict, load_config
from moe_dist.training.memory import plan
from tests.helpers.launch import ROOT, child_env, deepspeed_cmd, launch, python_cmd, run_ranks, torchrun_cmd
from tests.helpers.shared_runs import RESUMED_FROM, SHARED_STEPS, SharedRun, ep2_config, write_ds_config
from tests.training.train_workers import grad_sync_worker, tiny, train_worker


@pytest.mark.parametrize("world,ep,accum", [(4, 2, 1), (2, 2, 2), (2, 1, 1)])
def test_synced_grads_equal_single_process(world: int, ep: int, accum: int) -> None:
    """After the torch engine's sync, every rank's dense grads and each EP rank's expert grads equal the
    grads of ONE process holding all experts, on all ranks' batches concatenated (fp64, 1e-9): the
    objective is the mean of the ranks' losses, and the global aux loss pools every rank's tokens."""
    cfg_dict = tiny(parallel={"ep": ep}, train={"grad_accum": accum})
    res = run_ranks(grad_sync_worker, world, cfg_dict)
    cfg = config_from_dict(cfg_dict)
    torch.manual_seed(cfg.train.seed)
    ref = MoETransformer(cfg.model).double()
    for m in range(accum):
        x = torch.cat([r["batches"][m][0] for r in res])
        y = torch.cat([r["batches"][m][1] for r in res])
        out = ref(x)
        ((F.cross_entropy(out.logits_BSV.reshape(-1, 256), y.reshape(-1)) + out.aux_loss) / accum).backward()
    L = cfg.model.moe.num_experts // ep
    ref_sq = 0.0
    for name, p in ref.named_parameters():
        ref_sq += float((p.grad**2).sum())
        for r, got in enumerate(res):
            want = p.grad
            if ".experts." in name:
                e = got["ep_rank"]
                want = p.grad[e * L : (e + 1) * L]
            torch.testing.assert_close(
                got["grads"][name],
                want,
                rtol=1e-9,
                atol=1e-12,
                msg=lambda msg, n=name, r=r: f"rank {r} {n}: {msg}",
            )
    for got in res:
        assert got["norm"] == pytest.approx(ref_sq**0.5, rel=1e-9)


def _read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_learning_and_run_directory(tmp_path: Path) -> None:
    """Loss falls on the stdlib corpus; the run directory holds every promised artefact."""
    cfg = tiny(
        out_dir=str(tmp_path),
        name="learn",
        data={"kind": "stdlib", "max_bytes": 400_000},
        train={"steps": 30, "eval_every": 15, "micro_batch": 8},
    )
    summary = run_ranks(train_worker, 2, cfg, timeout=300)[0]
    run = tmp_path / "learn"
    recs = [r for r in _read_metrics(run) if "loss" in r]
    evals = [r for r in _read_metrics(run) if "val_loss" in r]
    assert len(recs) == 30 and len(evals) == 3  # at step 0, 15 and 30
    first, last = sum(r["loss"] for r in recs[:3]) / 3, sum(r["loss"] for r in recs[-3:]) / 3
    assert last < first - 1.0, f"train loss did not fall: {first:.3f} -> {last:.3f}"
    assert evals[-1]["val_loss"] < 4.0 < recs[0]["loss"]  # uniform over bytes is ln 256 = 5.55
    for key in (
        "aux/switch",
        "aux/z",
        "lr",
        "tokens_per_s",
        "load/L0/maxvio",
        "load/L1/cv",
        "load/L0/dropped",
    ):
        assert key in recs[0], key
    assert len(recs[0]["tokens_per_expert"]) == 2 and sum(recs[0]["tokens_per_expert"][0]) == 2 * 8 * 16 * 2
    assert (run / "config.yaml").is_file() and list((run / "tb").iterdir())
    assert checkpoint_dirs(run / "checkpoints")[-1].name == "step_00000030"  # newest; no latest pointer
    assert not (run / "checkpoints" / "latest").exists()
    assert summary["final_val_loss"] == pytest.approx(evals[-1]["val_loss"])
    assert json.loads((run / "summary.json").read_text())["mean_maxvio_per_layer"]


def test_resume_is_exact_and_survives_a_corrupt_shard(torch_ep2_run: SharedRun, tmp_path: Path) -> None:
    """A 6-step run with checkpoints at 3 and 6 (a copy of the session's shared torch-engine run without
    its checkpoints of steps 1, 2, 4 and 5). Corrupt a shard of step 6: the resumed run must name the
    file, fall back to step 3, and reproduce steps 4-6 bit for bit."""
    a, b = torch_ep2_run.path, torch_ep2_run.copy(tmp_path / "b")
    for step in (1, 2, 4, 5):
        shutil.rmtree(b / "checkpoints" / f"step_{step:08d}")
    (b / "metrics.jsonl").write_text("")
    shard = b / "checkpoints" / "step_00000006" / "rank1.pt"
    shard.write_bytes(shard.read_bytes()[:-10])
    run_ranks(train_worker, 2, ep2_config(tmp_path, "b"))
    got = {r["step"]: r for r in _read_metrics(b) if "loss" in r}
    want = {r["step"]: r for r in _read_metrics(a) if "loss" in r}
    assert sorted(got) == [3, 4, 5]
    for step in got:
        for key in ("loss", "aux_loss", "grad_norm", "lr", "tokens_per_expert"):
            assert got[step][key] == want[step][key], (step, key)


def test_a_bad_file_is_named_and_only_its_checkpoint_is_dropped(
    torch_ep2_run: SharedRun, tmp_path: Path
) -> None:
    """verified_checkpoints on a copy of the shared run: a truncated shard (step 6) and a same-size byte
    flip (step 5) each drop only their own checkpoint, and the reason names the file and what is wrong."""
    from moe_dist.checkpoint.files import verified_checkpoints

    b = torch_ep2_run.copy(tmp_path / "b") / "checkpoints"
    short = b / "step_00000006" / "rank1.pt"
    short.write_bytes(short.read_bytes()[:-10])
    flipped = b / "step_00000005" / "dense.pt"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    good, errors = verified_checkpoints(b, lambda manifest: list(manifest["files"]))
    assert sorted(good) == [1, 2, 3, 4] and sorted(errors) == [5, 6]
    assert f"{short} is truncated or altered" in errors[6]
    assert f"{flipped} is corrupt: sha256 does not match the manifest" in errors[5]


def _as_format1(run: Path) -> None:
    """Make every checkpoint's manifest say format 1 (written before per-expert files): the layout
    decision reads only the manifest."""
    for mpath in (run / "checkpoints").glob("step_*/manifest.json"):
        manifest = json.loads(mpath.read_text())
        manifest.pop("format")
        manifest.pop("experts")
        mpath.write_text(json.dumps(manifest))


def test_format1_checkpoint_at_another_layout_is_a_clear_error(
    torch_ep2_run: SharedRun, tmp_path: Path
) -> None:
    """A copy of the session's shared EP=2 run, its manifests made format 1, resumed at EP=1."""
    _as_format1(torch_ep2_run.copy(tmp_path / "a"))
    cfg = ep2_config(tmp_path)
    res = run_ranks(train_worker, 2, dict(cfg, parallel={**cfg["parallel"], "ep": 1}), expect_errors=True)
    for status, msg in res:
        assert status == "error" and "ConfigError" in msg and "world=2, ep=2" in msg, msg
        assert "predates per-expert checkpoints" in msg


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["model.moe.topk=1"], "did you mean model.moe.top_k"),
        (["trian.steps=1"], "did you mean train"),
        (["model.n_heads=3"], "not divisible by model.n_heads"),
        (["parallel.ep=3"], "does not divide the world size 2"),
        (["model.moe.num_experts=6", "parallel.ep=4"], "does not divide the world size 2"),
        (["optim.beta2=1.5"], "optim.beta2"),
        (["data.kind=text", "data.paths=[/nonexistent/*.txt]"], "matches no file"),
        (["train.steps=ten"], "train.steps must be int"),
        (["data.max_bytes=20000.5"], "data.max_bytes must be an integer, got 20000.5"),
        (["name=.."], "name must be a plain directory name"),
    ],
)
def test_config_errors_are_clear(overrides: list[str], needle: str, tmp_path: Path) -> None:
    """Through the real entry point with WORLD_SIZE=2 and no launcher: every error comes before any
    process group exists (the command exits 2 at once instead of waiting for peers), and nothing is written
    (runs/.. would be tmp_path itself)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny(out_dir=str(tmp_path / "runs"))))
    p = launch(python_cmd(cfg, *overrides), env=child_env(WORLD_SIZE="2", RANK="0"), timeout=60)
    assert p.returncode == 2, p.stderr[-2000:]
    assert needle in p.stderr
    assert [q.name for q in tmp_path.iterdir()] == ["c.yaml"]


def test_ep_must_divide_experts() -> None:
    with pytest.raises(ConfigError, match="num_experts=6 is not divisible by parallel.ep=4"):
        load_config(None, ["model.moe.num_experts=6", "parallel.ep=4"]).check_world(8)


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared runs' config (``shared_runs.write_ds_config``) launched by torchrun with engine=torch."""
    root = tmp_path_factory.mktemp("torchrun")
    launch([*torchrun_cmd(write_ds_config(root), "t"), "engine=torch"], check=True)
    return root / "t"


def test_torchrun_launch(torchrun_run: Path) -> None:
    s = json.loads((torchrun_run / "summary.json").read_text())
    assert s["steps"] == SHARED_STEPS and s["engine"] == "torch" and s["ep"] == 2


def test_deepspeed_launch_matches_torch_engine(
    torchrun_run: Path, ds_zero2_run: SharedRun, tmp_path: Path
) -> None:
    """Same seed and config under both engines and ZeRO stages 0-2: per-step losses are equal. They were
    bit-identical when measured (same reduction groups, same fp32 AdamW); we allow 1e-6 relative so that a
    DeepSpeed release that re-buckets its all-reduce does not fail for summation order alone.

    The torch-engine run is test_torchrun_launch's and the ZeRO-2 run the session's shared one
    (tests/shared_runs.py); ZeRO 0 and 1 run here on the same config file, overriding only the stage.
    The runs have 6 steps; the first 5 losses are compared, as when this test ran 5 steps of its own:
    step 5 (0-based 4) is the first whose grad norm exceeds optim.grad_clip (1.04 > 1.0), and under
    ZeRO 0, which clips with DeepSpeed's own code, the loss of step 6 then differs from the torch
    engine's by 1.4e-6 relative (ZeRO 1/2 stay bit-identical; with grad_clip=100 all four are)."""
    pytest.importorskip("deepspeed")
    compared = 5
    cfg = write_ds_config(tmp_path)
    t = [r["loss"] for r in _read_metrics(torchrun_run) if "loss" in r]
    assert len(t) == SHARED_STEPS
    runs = {0: tmp_path / "d0", 1: tmp_path / "d1", 2: ds_zero2_run.path}
    for zero, run in runs.items():
        if zero != 2:
            launch(deepspeed_cmd(cfg, run.name, f"deepspeed.zero_stage={zero}"), check=True)
        d = [r["loss"] for r in _read_metrics(run) if "loss" in r]
        assert len(d) == SHARED_STEPS, f"ZeRO stage {zero}"
        assert d[:compared] == pytest.approx(t[:compared], rel=1e-6), f"ZeRO stage {zero}"
        assert json.loads((run / "summary.json").read_text())["engine"] == "deepspeed"
        assert yaml.safe_load((run / "config.yaml").read_text())["deepspeed"]["zero_stage"] == zero
        if zero:  # the planner's ZeRO partitions, exactly (test_memory_plan.py checks ZeRO-2's gradients too)
            planned = plan(load_config(run / "config.yaml"), 2, 2, "deepspeed", zero, dtype="fp32")
            memory = json.loads((run / "summary.json").read_text())["memory_per_rank"]
            assert (memory["optimizer"], memory["master"]) == (planned.optimizer, planned.master), zero


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_config(path)
    cfg.check_world(2 * cfg.parallel.ep)  # any world that the EP size divides


def test_deepspeed_zero2_resume_is_exact(ds_zero2_run: SharedRun, ds_zero2_resumed: SharedRun) -> None:
    """engine=deepspeed with ZeRO-2: the session's shared 6-step run, cut back to its step-3 checkpoint and
    resumed (tests/shared_runs.py), repeats the uninterrupted run's losses of steps 4-6 exactly."""
    want = {r["step"]: r["loss"] for r in _read_metrics(ds_zero2_run.path) if "loss" in r}
    got = {r["step"]: r["loss"] for r in _read_metrics(ds_zero2_resumed.path) if "loss" in r}
    assert RESUMED_FROM == 3 and sorted(got) == [3, 4, 5] and all(got[s] == want[s] for s in got), (got, want)


def test_text_corpus_with_relative_globs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative globs, a non-UTF-8 file and an empty file: read as bytes, split by file, sharded."""
    from moe_dist.data.config import DataConfig
    from moe_dist.data.corpus import Corpus, DataError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    for i in range(6):
        (tmp_path / "d" / f"f{i}.txt").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "d" / "latin1.txt").write_bytes("café".encode("latin-1") * 500)
    (tmp_path / "d" / "empty.txt").write_bytes(b"")
    corpus = Corpus.build(DataConfig(kind="text", paths=["d/*.txt"], val_every=3), 16, 1, 2, 0)
    assert corpus.train.numel() > 0 and corpus.val.numel() > 0
    # the by-file split hashes paths relative to the data directory: moving it keeps the split
    import shutil

    shutil.copytree(tmp_path / "d", tmp_path / "moved" / "deeper" / "d")
    moved = Corpus.build(DataConfig(kind="text", paths=["moved/deeper/d/*.txt"], val_every=3), 16, 1, 2, 0)
    assert torch.equal(moved.train, corpus.train) and torch.equal(moved.val, corpus.val)
    # the validation files hold too few bytes for two sequences: fall back to cutting the one stream
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "big.txt").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "s" / "tiny.txt").write_bytes(b"x" * 5)
    for every in (11, 13, 31):  # each puts tiny.txt and big.txt on opposite sides
        small = Corpus.build(DataConfig(kind="text", paths=["s/*.txt"], val_every=every), 16, 0, 1, 0)
        assert small.val.numel() >= 34 and small.train.numel() >= 34
    x, y = corpus.batch("train", 4, 16, 0, 1, 0, 0)
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(DataError, match="matches no file"):
        Corpus.build(DataConfig(kind="text", paths=["nope/*.txt"]), 16, 0, 1, 0)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "z.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        Corpus.build(DataConfig(kind="text", paths=["e/*.txt"]), 16, 0, 1, 0)
