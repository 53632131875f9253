"""``engine: fsdp`` (FSDP2 beside expert parallelism) against the single-process fp64 oracle, and its
checkpoints across engines and layouts. One launch per world size runs every case of that world."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe_dist.checkpoint.global_state import split_model, split_optimizer
from moe_dist.checkpoint.names import DENSE
from moe_dist.checkpoint.verify import load_obj
from moe_dist.data.corpus import Corpus
from moe_dist.errors import ConfigError
from moe_dist.models.transformer import MoETransformer
from moe_dist.moe.layer import update_expert_biases
from moe_dist.moe.parallel import ParallelLayout
from moe_dist.training.config import config_from_dict
from moe_dist.training.engine import TorchEngine
from tests.helpers.launch import run_ranks
from tests.training.fsdp_workers import runs_worker
from tests.training.train_workers import tiny

STEPS, ACCUM, GLOBAL_MICRO = 2, 2, 8
"""Two optimizer steps of two micro-batches of 8 sequences (over all ranks) each."""


def _cfg(tmp: Path, name: str, engine: str, world: int, ep: int) -> dict:
    train = {"steps": STEPS, "grad_accum": ACCUM, "micro_batch": GLOBAL_MICRO // world, "ckpt_every": 1}
    train.update(eval_every=STEPS, keep_last=5)
    # why grad_clip 0.1: the tiny model's first grad norms are about 0.5, so clipping is exercised
    optim = {"warmup_steps": 2, "grad_clip": 0.1}
    return tiny(out_dir=str(tmp), name=name, engine=engine, parallel={"ep": ep}, train=train, optim=optim)


def _oracle(cfg_dict: dict, world: int) -> list[dict]:
    """One process holding every expert, fed all ranks' micro-batches concatenated, with the torch engine's
    optimizer step (fp64): its global view after each step."""
    cfg = config_from_dict(cfg_dict)
    t, S = cfg.train, cfg.model.seq_len
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # why: the ranks build their fp64 model the same way
    try:
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        model = MoETransformer(cfg.model)
        engine = TorchEngine(model, cfg, ParallelLayout(world=1, rank=0, ep=1), torch.device("cpu"))
        corpora = [Corpus.build(cfg.data, S, r, world, t.seed) for r in range(world)]
        states = []
        for step in range(STEPS):
            for micro in range(ACCUM):
                xs, ys = zip(
                    *(
                        c.batch("train", t.micro_batch, S, t.seed, r, step, micro)
                        for r, c in enumerate(corpora)
                    ),
                    strict=True,
                )
                out = model(torch.cat(xs))
                ce = F.cross_entropy(out.logits_BSV.reshape(-1, 256), torch.cat(ys).reshape(-1))
                engine.backward(ce + out.aux_loss)
            engine.step()
            update_expert_biases(model)
            dense, experts = split_model(model)
            d_opt, e_opt, _ = split_optimizer(model, engine.optimizer)
            # why clones: split_model's dense tensors are the live parameters
            moments = {
                k: (s["exp_avg"].clone(), s["exp_avg_sq"].clone()) for k, s in {**d_opt, **e_opt}.items()
            }
            states.append(
                {"params": {k: v.clone() for k, v in {**dense, **experts}.items()}, "moments": moments}
            )
        return states
    finally:
        torch.set_default_dtype(before)


def _merged(results: list[dict], what: str) -> dict:
    out: dict = {}
    for r in results:
        out.update(r[what])
    return out


def _assert_state(got_ranks: list[dict], want: dict, label: str) -> None:
    """Every parameter (experts by id, gathered over the ranks) and AdamW moment equals the oracle's."""
    params, moments = _merged(got_ranks, "params"), _merged(got_ranks, "moments")
    assert sorted(params) == sorted(want["params"]), label
    for k, v in want["params"].items():
        torch.testing.assert_close(
            params[k], v, rtol=1e-9, atol=1e-12, msg=lambda m, k=k: f"{label} {k}: {m}"
        )
    assert sorted(moments) == sorted(want["moments"]), label
    for k, (avg, avg_sq) in want["moments"].items():
        torch.testing.assert_close(
            moments[k][0], avg, rtol=1e-9, atol=1e-12, msg=lambda m, k=k: f"{label} {k}: {m}"
        )
        torch.testing.assert_close(moments[k][1], avg_sq, rtol=1e-9, atol=1e-14)


def _checkpoint_state(run: Path, step: int) -> list[dict]:
    """The global view as a checkpoint's files hold it (dense.pt and every experts file)."""
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    files = [
        load_obj(p) for p in sorted(ckpt.glob("*.pt")) if p.name == DENSE or p.name.startswith("experts")
    ]
    return [
        {
            "params": f["model"],
            "moments": {k: (s["exp_avg"], s["exp_avg_sq"]) for k, s in f["optimizer"].items()},
        }
        for f in files
    ]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in _rows(run) if "loss" in r]


def _resume_checks(run: Path) -> list[str]:
    return [r["resume_check"] for r in _rows(run) if "resume_check" in r]


@pytest.fixture(scope="module")
def oracle() -> list[dict]:
    return _oracle(_cfg(Path("unused"), "o", "torch", 4, 2), 4)


@pytest.fixture(scope="module")
def world4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[dict]]]:
    """One launch of 4 ranks: fsdp and torch at EP 2 x DP 2, each resumed from the other's step-1
    checkpoint, and fsdp at EP 4 (experts unsharded)."""
    root = tmp_path_factory.mktemp("fsdp4")
    runs = [
        (_cfg(root, "fsdp_e2", "fsdp", 4, 2), None, "float64"),
        (_cfg(root, "torch_e2", "torch", 4, 2), None, "float64"),
        (_cfg(root, "fsdp_to_torch", "torch", 4, 2), ("resume", "fsdp_e2", 1), "float64"),
        (_cfg(root, "torch_to_fsdp", "fsdp", 4, 2), ("resume", "torch_e2", 1), "float64"),
        (_cfg(root, "fsdp_e4", "fsdp", 4, 4), None, "float64"),
    ]
    res = run_ranks(runs_worker, 4, runs, timeout=600)
    return root, {cfg["name"]: [r[i] for r in res] for i, (cfg, _, _) in enumerate(runs)}


def test_fsdp_equals_the_fp64_oracle_at_ep2_dp2_and_ep4(world4, oracle: list[dict]) -> None:
    """After one and two optimizer steps (two micro-batches each) under engine fsdp, every parameter's full
    tensor and every AdamW moment equals the single-process oracle's (fp64, 1e-9), at EP 2 x DP 2 (experts
    sharded over their expert-data-parallel pair) and EP 4 (experts unsharded); the step-1 state as the
    checkpoint files hold it, the step-2 state as the live model gathers it. The losses equal engine torch's,
    and the AdamW bytes per rank at DP 2 are at most 0.6x torch's."""
    root, res = world4
    for name in ("fsdp_e2", "fsdp_e4", "torch_e2"):
        _assert_state(res[name], oracle[-1], f"{name} after {STEPS} steps")
        _assert_state(_checkpoint_state(root / name, 1), oracle[0], f"{name} checkpoint of step 1")
    want = _losses(root / "torch_e2")
    assert len(want) == STEPS
    for name in ("fsdp_e2", "fsdp_e4"):
        assert _losses(root / name) == pytest.approx(want, rel=1e-9), name
    fsdp_opt = res["fsdp_e2"][0]["summary"]["memory_per_rank"]["optimizer"]
    torch_opt = res["torch_e2"][0]["summary"]["memory_per_rank"]["optimizer"]
    assert 0 < fsdp_opt <= 0.6 * torch_opt, (fsdp_opt, torch_opt)


def test_fsdp_and_torch_resume_each_other(world4, oracle: list[dict]) -> None:
    """fsdp's step-1 checkpoint resumed under engine torch, and torch's under engine fsdp: the resume
    self-check passes, and the state after step 2 equals the oracle's."""
    root, res = world4
    for name in ("fsdp_to_torch", "torch_to_fsdp"):
        assert _resume_checks(root / name) == ["pass"], name
        _assert_state(res[name], oracle[-1], name)


def test_fsdp_resumes_at_world_2_and_trains_an_hf_model(world4, oracle: list[dict], tmp_path: Path) -> None:
    """fsdp's world-4 (EP 2 x DP 2) step-1 checkpoint resumed by fsdp at world 2 (EP 2, experts unsharded),
    the global batch kept: the self-check passes and step 2 equals the oracle's. In the same launch, a
    transformers model (model.kind=hf, fp32) under each engine: fsdp's losses equal torch's to 1e-4."""
    pytest.importorskip("transformers")
    from tests.models.hf_workers import HF_TINY

    root, _ = world4
    shutil.copytree(root / "fsdp_e2", tmp_path / "fsdp_e2")
    runs = [(_cfg(tmp_path, "w2", "fsdp", 2, 2), ("resume", "fsdp_e2", 1), "float64")]
    for engine in ("torch", "fsdp"):
        hf = tiny(
            out_dir=str(tmp_path),
            name=f"hf_{engine}",
            engine=engine,
            model={"kind": "hf", "hf_config": HF_TINY, "seq_len": 16},
            parallel={"ep": 2},
            train={"steps": 3, "eval_every": 3},
        )
        hf["model"].pop("moe")
        runs.append((hf, None, "float32"))
    res = run_ranks(runs_worker, 2, runs, timeout=600)
    assert _resume_checks(tmp_path / "w2") == ["pass"]
    _assert_state([r[0] for r in res], oracle[-1], "world 2")
    want, got = _losses(tmp_path / "hf_torch"), _losses(tmp_path / "hf_fsdp")
    assert len(got) == 3 and got == pytest.approx(want, rel=1e-4)
    assert (
        res[0][2]["summary"]["memory_per_rank"]["params"] < res[0][1]["summary"]["memory_per_rank"]["params"]
    )


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"parallel": {"ep": 2, "redundant_experts": 1}}, "replicated experts"),
        ({"parallel": {"ep": 2, "placement": "balanced", "rebalance_every": 2}}, "placement=balanced"),
        ({"deepspeed": {"zero_stage": 2}}, "engine=deepspeed only"),
        ({"fsdp": {"reshard_after_forward": "yes"}}, "fsdp.reshard_after_forward"),
    ],
)
def test_unsupported_options_are_one_config_error(overrides: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(tiny(engine="fsdp", **overrides))
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_resume_may_switch_between_torch_and_fsdp_only() -> None:
    """The launch preflight: torch <-> fsdp is an allowed change (the same global checkpoint format, named in
    the warning); a switch to or from deepspeed stays refused."""
    from moe_dist.training.preflight import config_changes

    torch_cfg = config_from_dict(tiny()).to_dict()
    fsdp_cfg = config_from_dict(tiny(engine="fsdp", fsdp={"reshard_after_forward": False})).to_dict()
    refused, allowed = config_changes(torch_cfg, fsdp_cfg)
    assert refused == [] and "engine: 'torch' -> 'fsdp'" in allowed, allowed
    assert "fsdp.reshard_after_forward: True -> False" in allowed, allowed
    refused, _ = config_changes(fsdp_cfg, config_from_dict(tiny(engine="deepspeed")).to_dict())
    assert refused == ["engine: 'fsdp' -> 'deepspeed'"], refused
