"""The memory planner (moe_dist/training/memory.py, ``python -m moe_dist.plan``) against what runs measured
(summary.json's ``memory_per_rank``), and its parameter count of a published HF config against the count
written out from the config's fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_dist import cli
from moe_dist.plan import main as plan_main
from moe_dist.training.config import config_from_dict, load_config
from moe_dist.training.memory import model_counts, plan
from tests.helpers.launch import run_ranks
from tests.helpers.shared_runs import SharedRun
from tests.training.train_workers import tiny, train_worker

QWEN3_30B_A3B = {
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "num_hidden_layers": 48,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 768,
    "intermediate_size": 6144,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
}
"""Qwen3-30B-A3B's published config.json (the fields that shape its parameters)."""


def _measured(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())["memory_per_rank"]


def _check(planned, measured: dict, activations_rtol: float) -> None:
    """The three state figures exactly; the activation estimate within ``activations_rtol`` of the measured
    peak (bytes saved for backward, max over ranks and steps)."""
    got = {k: measured[k] for k in ("params", "grads", "optimizer")}
    assert got == {"params": planned.params, "grads": planned.grads, "optimizer": planned.optimizer}
    assert measured["master"] == planned.master == 0
    assert measured["peak_rss"] > planned.params + planned.grads + planned.optimizer
    estimate = planned.activations_per_micro_batch
    assert estimate == pytest.approx(measured["activations_peak"], rel=activations_rtol), (estimate, measured)


def test_plan_equals_measured_torch_engine(torch_ep2_run: SharedRun, tmp_path: Path) -> None:
    """Exactly (they are counts): the shared EP=2 run on 2 ranks, and a world-1 run of the same tiny model.
    The activation estimate (fp32, as CPU runs are) is within 1% of the measured peak at world 1, where one
    rank holds every expert, and within the issue's 25% at EP 2, where a rank receives the rows its
    experts were routed (not the uniform share the planner assumes)."""
    cfg = load_config(torch_ep2_run.path / "config.yaml")
    at_ep2 = plan(cfg, world=2, ep=2, engine="torch", dtype="fp32")
    _check(at_ep2, _measured(torch_ep2_run.path), activations_rtol=0.25)

    one = tiny(out_dir=str(tmp_path), name="w1", train={"steps": 1, "eval_every": 1, "val_sequences": 4})
    run_ranks(train_worker, 1, one)
    at_ep1 = plan(config_from_dict(one), world=1, ep=1, engine="torch", dtype="fp32")
    _check(at_ep1, _measured(tmp_path / "w1"), activations_rtol=0.01)
    assert at_ep2.params < at_ep1.params  # EP 2 halves the experts a rank holds
    bf16 = plan(config_from_dict(one), world=1, ep=1, engine="torch", dtype="bf16")
    assert bf16.activations_per_micro_batch < at_ep1.activations_per_micro_batch


def test_plan_equals_measured_hf_model(tmp_path: Path) -> None:
    """model.kind=hf (a tiny Qwen3-MoE): the planner's meta-device count of the transformers model equals what
    the trainer's swapped model holds, at world 1; its activation estimate (transformers' attention, our
    MoE layer) is within 25% of the measured peak."""
    pytest.importorskip("transformers")
    from tests.models.hf_workers import HF_TINY

    cfg = tiny(
        model={"kind": "hf", "hf_config": HF_TINY, "seq_len": 16},
        train={"steps": 1, "eval_every": 1, "val_sequences": 4},
        out_dir=str(tmp_path),
        name="hf",
    )
    cfg["model"].pop("moe")
    run_ranks(train_worker, 1, cfg)
    planned = plan(config_from_dict(cfg), world=1, ep=1, engine="torch", dtype="fp32")
    _check(planned, _measured(tmp_path / "hf"), activations_rtol=0.25)


def test_plan_equals_measured_deepspeed_zero2(ds_zero2_run: SharedRun) -> None:
    """The shared ZeRO-2 run (EP 2 on 2 ranks: dense state split over 2, experts' over their
    expert-data-parallel group of 1), exactly: the model's parameters, the AdamW moments of ZeRO's flat
    partitions, the fp32 gradient partitions its AdamW steps on, and the fp32 master partition DeepSpeed
    keeps although the model is fp32 (``single_partition_of_fp32_groups``, a clone)."""
    cfg = load_config(ds_zero2_run.path / "config.yaml")
    planned = plan(cfg, world=2, ep=2, engine="deepspeed", zero=2, dtype="fp32")
    measured = _measured(ds_zero2_run.path)
    got = {k: measured[k] for k in ("params", "grads", "optimizer", "master")}
    want = {"params": planned.params, "grads": planned.grads, "optimizer": planned.optimizer}
    assert got == want | {"master": planned.master}
    torch_engine = plan(cfg, world=2, ep=2, engine="torch")
    assert planned.optimizer < torch_engine.optimizer and planned.grads < torch_engine.grads
    assert planned.master == planned.grads > 0 and measured["peak_rss"] > planned.params


def ds_train_worker(rank: int, world: int, cfg: dict) -> dict:
    """``train_worker`` under ``engine: deepspeed`` in a spawned rank (DeepSpeed's comm over our group)."""
    import os

    import torch

    from moe_dist.training.deepspeed_engine import quiet_deepspeed

    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed's engine asserts that a launcher set it
    quiet_deepspeed(torch.device("cpu"))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    return train_worker(rank, world, cfg)


def test_deepspeed_padding_is_planned(tmp_path: Path) -> None:
    """d_model 34 at world 2, EP 1: the dense no-decay group (the norms, 5 x 34 = 170 elements) is not a
    multiple of DeepSpeed's alignment (2 x dp = 4), so ZeRO pads it to 172 and each rank's partition is 86,
    not 85. The planner's gradient, master and AdamW figures count that padding exactly, as measured."""
    pytest.importorskip("deepspeed")
    cfg = tiny(
        out_dir=str(tmp_path),
        name="ds",
        engine="deepspeed",
        deepspeed={"zero_stage": 2},
        model={"d_model": 34, "n_heads": 2},
        train={"steps": 1, "eval_every": 1, "val_sequences": 4},
    )
    counts = model_counts(config_from_dict(cfg))
    assert counts.dense_groups[1] % 4 != 0  # the premise: this group needs padding
    run_ranks(ds_train_worker, 2, cfg)
    planned = plan(config_from_dict(cfg), world=2, ep=1, engine="deepspeed", zero=2, dtype="fp32")
    measured = _measured(tmp_path / "ds")
    got = {k: measured[k] for k in ("params", "grads", "optimizer", "master")}
    want = {"params": planned.params, "grads": planned.grads, "optimizer": planned.optimizer}
    assert got == want | {"master": planned.master}
    unpadded = 4 * -(-(counts.dense + counts.expert) // 2)
    assert planned.grads > unpadded  # the padding is there, and counted


def _qwen3_from_fields(c: dict) -> tuple[int, int]:
    """(dense, routed expert) parameters of a qwen3_moe config, written out from its fields."""
    d, hd, layers = c["hidden_size"], c["head_dim"], c["num_hidden_layers"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    attn = d * q + 2 * d * kv + q * d + 2 * hd  # q, k, v, o and the q/k RMSNorms
    per_layer = attn + 2 * d + c["num_experts"] * d  # two RMSNorms, the router
    embeddings = c["vocab_size"] * d * (1 if c["tie_word_embeddings"] else 2)
    experts = layers * c["num_experts"] * 3 * d * c["moe_intermediate_size"]  # gate, up, down
    return layers * per_layer + embeddings + d, experts


def test_qwen3_30b_count_and_sharding() -> None:
    """The meta-device count of Qwen3-30B-A3B equals the count from its config fields (30.5B); fsdp and
    ZeRO shard what the issue says they shard."""
    pytest.importorskip("transformers")
    cfg = config_from_dict({"model": {"kind": "hf", "hf_config": QWEN3_30B_A3B}})
    counts = model_counts(cfg)
    assert (counts.dense, counts.expert) == _qwen3_from_fields(QWEN3_30B_A3B)
    assert (counts.moe_layers, counts.num_experts, counts.top_k) == (48, 128, 8)
    torch_p = plan(cfg, world=8, ep=8, engine="torch")
    fsdp_p = plan(cfg, world=8, ep=8, engine="fsdp")
    assert torch_p.params == 4 * (counts.dense + counts.expert // 8)
    # EP = world: the experts' expert-data-parallel group is one rank, so only the dense part shards
    assert fsdp_p.params == 4 * (-(-counts.dense // 8) + counts.expert // 8)
    assert fsdp_p.optimizer == 2 * fsdp_p.params
    zero2 = plan(cfg, world=8, ep=2, engine="deepspeed", zero=2, dtype="fp32")
    assert zero2.params == 4 * (counts.dense + counts.expert // 2)
    even = 4 * (-(-counts.dense // 8) + -(-counts.expert // 2 // 4))  # before DeepSpeed's padding
    assert zero2.grads == zero2.master == zero2.optimizer // 2
    assert 0 <= zero2.grads - even <= 4 * 2 * 2  # at most 1 padding element per rank in each of 4 groups
    # bf16: DeepSpeed's model parameters are bf16, its partitions fp32
    bf16 = plan(cfg, world=8, ep=2, engine="deepspeed", zero=2, dtype="bf16")
    assert bf16.params * 2 == zero2.params and (bf16.grads, bf16.master) == (zero2.grads, zero2.master)


def test_plan_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``python -m moe_dist.plan`` and ``moe-dist plan``: the table, --json, and one line for bad input."""
    args = ["configs/cpu_demo.yaml", "--world", "4", "--ep", "2", "--engine", "fsdp"]
    assert plan_main([*args, "--json", "--dtype", "fp32", "train.micro_batch=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = load_config("configs/cpu_demo.yaml", ["train.micro_batch=2"])
    expected = plan(cfg, 4, 2, "fsdp", dtype="fp32")
    assert out == expected.to_json() and out["dtype"] == "fp32"
    assert cli.main(["plan", *args, "train.micro_batch=2"]) == 0  # the config's train.bf16: bf16
    table = capsys.readouterr().out
    bf16 = plan(cfg, 4, 2, "fsdp", dtype="bf16")
    assert "engine fsdp, bf16, world 4 = EP 2 x DP 2" in table and f"{bf16.optimizer:,d}" in table
    assert f"{bf16.activations_per_micro_batch:,d}" in table
    assert plan_main(["configs/cpu_demo.yaml", "--world", "4", "--ep", "3"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and err.startswith("ConfigError: --world 4 must be")
    assert plan_main([*args, "data.kind=tokens", f"data.path={tmp_path / 'none'}"]) == 2  # vocab: the data
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "is not a prepared token directory" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {kind: hf, hf_config: {model_type: no_such_family}}\n")
    assert plan_main([str(bad), "--world", "2"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and err.startswith("ConfigError: model.hf_config: ")
