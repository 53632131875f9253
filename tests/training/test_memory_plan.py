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


def _check(planned, measured: dict) -> None:
    got = {k: measured[k] for k in ("params", "grads", "optimizer")}
    assert got == {"params": planned.params, "grads": planned.grads, "optimizer": planned.optimizer}
    assert measured["peak_rss"] > planned.params + planned.grads + planned.optimizer


def test_plan_equals_measured_torch_engine(torch_ep2_run: SharedRun, tmp_path: Path) -> None:
    """Exactly (they are counts): the shared EP=2 run on 2 ranks, and a world-1 run of the same tiny model."""
    cfg = load_config(torch_ep2_run.path / "config.yaml")
    at_ep2 = plan(cfg, world=2, ep=2, engine="torch")
    _check(at_ep2, _measured(torch_ep2_run.path))

    one = tiny(out_dir=str(tmp_path), name="w1", train={"steps": 1, "eval_every": 1, "val_sequences": 4})
    run_ranks(train_worker, 1, one)
    at_ep1 = plan(config_from_dict(one), world=1, ep=1, engine="torch")
    _check(at_ep1, _measured(tmp_path / "w1"))
    assert at_ep2.params < at_ep1.params  # EP 2 halves the experts a rank holds


def test_plan_equals_measured_hf_model(tmp_path: Path) -> None:
    """model.kind=hf (a tiny Qwen3-MoE): the planner's meta-device count of the transformers model equals what
    the trainer's swapped model holds, at world 1."""
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
    _check(plan(config_from_dict(cfg), world=1, ep=1, engine="torch"), _measured(tmp_path / "hf"))


def test_plan_equals_measured_deepspeed_zero2(ds_zero2_run: SharedRun) -> None:
    """The shared ZeRO-2 run (EP 2 on 2 ranks: dense AdamW state split over 2, experts' over their
    expert-data-parallel group of 1): parameters and AdamW moments exactly. The planner does not model
    DeepSpeed's alignment padding of its flat groups; these shapes need none. Gradients are not measured under
    DeepSpeed (its ZeRO buckets hold them, not the parameters): ``null``."""
    cfg = load_config(ds_zero2_run.path / "config.yaml")
    planned = plan(cfg, world=2, ep=2, engine="deepspeed", zero=2)
    measured = _measured(ds_zero2_run.path)
    assert (measured["params"], measured["optimizer"]) == (planned.params, planned.optimizer)
    assert planned.optimizer < plan(cfg, world=2, ep=2, engine="torch").optimizer
    assert measured["grads"] is None and measured["peak_rss"] > planned.params


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
    zero2 = plan(cfg, world=8, ep=2, engine="deepspeed", zero=2)
    assert zero2.params == 4 * (counts.dense + counts.expert // 2)
    assert zero2.grads == zero2.optimizer // 2 == 4 * (-(-counts.dense // 8) + -(-counts.expert // 2 // 4))


def test_plan_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``python -m moe_dist.plan`` and ``moe-dist plan``: the table, --json, and one line for bad input."""
    args = ["configs/cpu_demo.yaml", "--world", "4", "--ep", "2", "--engine", "fsdp"]
    assert plan_main([*args, "--json", "train.micro_batch=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = plan(load_config("configs/cpu_demo.yaml", ["train.micro_batch=2"]), 4, 2, "fsdp")
    assert out == expected.to_json()
    assert cli.main(["plan", *args]) == 0
    table = capsys.readouterr().out
    assert "engine fsdp, world 4 = EP 2 x DP 2" in table and f"{expected.optimizer:,d}" in table
    assert plan_main(["configs/cpu_demo.yaml", "--world", "4", "--ep", "3"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and err.startswith("ConfigError: --world 4 must be")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {kind: hf, hf_config: {model_type: no_such_family}}\n")
    assert plan_main([str(bad), "--world", "2"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and err.startswith("ConfigError: model.hf_config: ")
