"""model.hf_pretrained: a transformers checkpoint directory loaded expert-parallel. The reference is
transformers' own ``from_pretrained`` in one process; what each rank read is checked against the bytes of
the checkpoint's dense tensors and of the experts its slots hold, counted from the safetensors headers."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from moe_dist import ConfigError  # noqa: E402
from tests.helpers import ROOT  # noqa: E402
from tests.helpers.launch import run_ranks  # noqa: E402
from tests.models.hf_load_workers import save_fixture, save_fused  # noqa: E402
from tests.training.train_workers import tiny  # noqa: E402

EXPERT_KEY = re.compile(r"\.experts\.(\d+)\.")
FUSED_KEY = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")


FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3", "qwen2_moe", "olmoe")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_pretrained")
    out = {kind: save_fixture(kind, root / kind) for kind in FAMILIES}
    out["qwen3_fused"] = save_fused(out["qwen3_moe"], root / "qwen3_fused")
    out["qwen3_bf16"] = save_fixture("qwen3_moe", root / "qwen3_bf16", seed=2, dtype=torch.bfloat16)
    (out["qwen3_moe"] / "tokenizer_config.json").write_text('{"model_max_length": 16}\n')  # export copies it
    for path in out.values():
        assert len(list(path.glob("*.safetensors"))) >= 3, path  # several shards, read through the index
    out["mixtral_single"] = save_fixture("mixtral", root / "mixtral_single", seed=1, shard="1GB")
    assert [f.name for f in out["mixtral_single"].glob("*.safetensors")] == ["model.safetensors"]
    out["qwen3_tok"], out["tokens"] = tokenized_fixture(root / "tok")
    return out


def tokenized_fixture(root: Path) -> tuple[Path, Path]:
    """docs/finetune.md's example, small: launch/make_finetune_example.py's Qwen3-MoE with its BPE tokenizer
    (300 ids) in the same directory, and its documents prepared with that tokenizer (prepare_data)."""
    from moe_dist.data.prepare import prepare

    spec = importlib.util.spec_from_file_location("make_finetune_example", ROOT / "launch" / EXAMPLE)
    example = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(example)  # type: ignore[union-attr]
    made = example.make_example(root, vocab=300, hidden=16, layers=2, experts=4, max_bytes=150_000)
    data = root / "data"
    prepare(str(made["model"]), data, [str(made["docs"])], val_fraction=0.2, progress=False)
    return made["model"], data


NAMES = [*FAMILIES, "qwen3_fused", "mixtral_single"]
REDUNDANT = {"qwen3_fused": 1}
"""Replicas per rank of each load case (the others: none)."""
WORLD, EP = 4, 2
"""The one spawn: EP=2 x DP=2."""
_G = torch.Generator().manual_seed(0)
LOAD_TOKENS = [torch.randint(0, 256, (2, 12), generator=_G) for _ in range(WORLD)]
"""Each rank's tokens for the load cases."""
TRAINER_TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
FINETUNE_STEPS = 30
FINETUNE_TRAIN = {
    "steps": FINETUNE_STEPS,
    "micro_batch": 2,
    "eval_every": FINETUNE_STEPS,
    "ckpt_every": 10,
    "keep_last": 3,
    "val_sequences": 8,
    "async_save": True,
}
"""The fine-tune of the pretrained Qwen3-MoE at EP=2 x DP=2 (the straggler profiler on, as by default)."""
HF_MOE = {"aux_loss_coef": 0.05, "z_loss_coef": 1e-3}
"""model.hf_moe overrides on top of the checkpoint's routing."""
CONVERT = {"qwen3_moe": 1, "qwen3_fused": 1, "deepseek_v3": 0, "qwen3_bf16": 0}
"""The conversion runs (train.steps=0 at EP=2 x DP=2): source fixture -> replicas per rank."""
CONVERT_TRAIN = {"steps": 0, "val_sequences": 4}
EXAMPLE = "make_finetune_example.py"
TOKENS_TRAIN = {"steps": 4, "micro_batch": 2, "eval_every": 4, "val_sequences": 4}
"""The pretrained model on tokenized data (EP=2 x DP=2), run after the conversion runs."""


def _hf_run(path: Path, out_dir: Path, name: str, parallel: dict, train: dict) -> dict:
    cfg = tiny(
        name=name,
        model={"kind": "hf", "hf_pretrained": str(path), "seq_len": 16},
        parallel=parallel,
        train=train,
        out_dir=str(out_dir),
    )
    cfg["model"].pop("moe")
    return cfg


@pytest.fixture(scope="module")
def ranks(ckpts: dict[str, Path], tmp_path_factory) -> dict:
    """One spawn of 4 ranks (EP=2 x DP=2) for every test here: the loads of every case, the trainer's run,
    and the conversion runs."""
    from tests.models.hf_load_workers import both_worker

    out_dir = tmp_path_factory.mktemp("hf_pretrained_runs")
    cfg = _hf_run(
        ckpts["qwen3_moe"],
        out_dir,
        "tiny",
        {"ep": EP, "redundant_experts": 1},
        FINETUNE_TRAIN,
    )
    cfg["model"]["hf_moe"] = HF_MOE
    convert = [
        _hf_run(ckpts[n], out_dir, f"convert_{n}", {"ep": EP, "redundant_experts": r}, CONVERT_TRAIN)
        for n, r in CONVERT.items()
    ]
    tokens = _tokens_run(ckpts, out_dir)
    convert.append(tokens)
    cases = [(str(ckpts[n]), REDUNDANT.get(n, 0)) for n in NAMES]
    results = run_ranks(
        both_worker, WORLD, (EP, cases, LOAD_TOKENS), (cfg, TRAINER_TOKENS), convert, timeout=400
    )
    return {
        "load": [r["load"] for r in results],
        "trainer": [r["trainer"] for r in results],
        "convert": [r["convert"] for r in results],
        "runs": out_dir,
        "tokens": tokens,
    }


def _tokens_run(ckpts: dict[str, Path], out_dir: Path) -> dict:
    cfg = _hf_run(ckpts["qwen3_tok"], out_dir, "tokens", {"ep": EP}, TOKENS_TRAIN)
    cfg["data"] = {"kind": "tokens", "path": str(ckpts["tokens"])}
    return cfg


def tensor_bytes(path: Path) -> tuple[int, dict[int, int]]:
    """(dense bytes, bytes of each expert id) of a checkpoint, from the safetensors headers."""
    from safetensors import safe_open

    dense, per_expert = 0, {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                s = sf.get_slice(key)
                shape = s.get_shape()
                nbytes = {"F32": 4, "BF16": 2, "F16": 2}[s.get_dtype()]
                for d in shape:
                    nbytes *= d
                m, fused = EXPERT_KEY.search(key), FUSED_KEY.search(key)
                if m:
                    e = int(m.group(1))
                    per_expert[e] = per_expert.get(e, 0) + nbytes
                elif fused:  # N rows, one per expert
                    for e in range(shape[0]):
                        per_expert[e] = per_expert.get(e, 0) + nbytes // shape[0]
                else:
                    dense += nbytes
    return dense, per_expert


def test_ep2_load_matches_from_pretrained_and_reads_only_own_experts(
    ckpts: dict[str, Path], ranks: dict
) -> None:
    """EP=2 x DP=2, 4 ranks, all five families: Qwen3-MoE and Mixtral (the two per-expert key layouts),
    DeepSeek-V3 (shared experts, a selection bias, a dense first layer), Qwen2-MoE (a gated shared expert),
    OLMoE; Qwen3-MoE in the fused layout with one replica per rank, and a one-file (no index) Mixtral.
    Logits equal from_pretrained's on the same tokens to 1e-5 (fp32), and each rank read the dense tensors
    and its own experts (at least; at most 5% more), far less than the whole checkpoint."""
    from transformers import AutoModelForCausalLM

    results, tokens, names = ranks["load"], LOAD_TOKENS, NAMES
    for i, name in enumerate(names):
        ref = AutoModelForCausalLM.from_pretrained(ckpts[name], dtype=torch.float32).eval()
        dense, per_expert = tensor_bytes(ckpts[name])
        if name == "qwen3_fused":
            assert len(results[0][i]["experts"]) == 5  # 4 own + 1 replica
        for rank in range(WORLD):
            got = results[rank][i]
            with torch.no_grad():
                want = ref(input_ids=tokens[rank], use_cache=False).logits
            err = float((got["logits"] - want).abs().max())
            assert err <= 1e-5 * float(want.abs().max()), (name, rank, err)
            own = dense + sum(per_expert[e] for e in got["experts"])
            assert own <= got["bytes_read"] <= 1.05 * own, (name, rank, got["bytes_read"], own)
            assert got["bytes_read"] < 0.8 * (dense + sum(per_expert.values())), (name, rank)
            assert got["checkpoint_bytes"] == sum(f.stat().st_size for f in ckpts[name].glob("*.safetensors"))


def _check(path: Path, world: int = 2) -> None:
    from moe_dist.training.config import config_from_dict

    cfg = tiny(model={"kind": "hf", "hf_pretrained": str(path), "seq_len": 16}, parallel={"ep": 2})
    cfg["model"].pop("moe")
    config_from_dict(cfg).check_world(world)


def test_missing_shard_key_or_non_moe_is_one_config_error(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """Refused by the launch's check (before any process group, no tensor read): a shard named by the index
    is missing, a key is missing, the config is not an MoE; each is one ConfigError line."""
    _check(ckpts["mixtral"])  # the intact checkpoint passes
    shard = tmp_path / "shard"
    shutil.copytree(ckpts["mixtral"], shard)
    victim = sorted(shard.glob("*.safetensors"))[1]
    victim.unlink()
    key = tmp_path / "key"
    shutil.copytree(ckpts["mixtral"], key)
    index = json.loads((key / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    (key / "model.safetensors.index.json").write_text(json.dumps(index))
    dense = tmp_path / "dense"
    dense.mkdir()
    cfg = json.loads((ckpts["qwen3_moe"] / "config.json").read_text())
    for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"):
        cfg.pop(k, None)
    cfg.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], intermediate_size=32)
    (dense / "config.json").write_text(json.dumps(cfg))
    for path, pattern in (
        (shard, f"shard {victim.name} named by model.safetensors.index.json is missing"),
        (key, "lacks model.layers.1.block_sparse_moe.experts.3.w3.weight"),
        (dense, "(qwen3) is not a sparse-MoE model"),
    ):
        with pytest.raises(ConfigError, match=re.escape(pattern)) as err:
            _check(path)
        assert "\n" not in str(err.value), str(err.value)


def test_trainer_starts_from_the_pretrained_weights_and_records_the_load(
    ckpts: dict[str, Path], ranks: dict
) -> None:
    """The trainer (4 in-process ranks, EP=2 x DP=2, one replica per rank) with model.hf_pretrained: before
    any step its logits are from_pretrained's; hf_load.json in the run directory holds each rank's
    bytes_read (within the bound above), the checkpoint's bytes and the peak RSS after loading. The
    ``model.hf_moe`` overrides sit on top of the checkpoint's routing (top-K, renormalisation, expert count
    from its config); 30 fine-tuning steps, with async save and the straggler profiler on, lower the val
    loss, and every checkpoint is committed."""
    from transformers import AutoModelForCausalLM

    from moe_dist.checkpoint.files import checkpoint_dirs

    path, tokens, results = ckpts["qwen3_moe"], TRAINER_TOKENS, ranks["trainer"]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(input_ids=tokens, use_cache=False).logits
    config = json.loads((path / "config.json").read_text())
    routing = (config["num_experts_per_tok"], config["num_local_experts"], config["norm_topk_prob"])
    for r in results:
        assert float((r["logits"] - want).abs().max()) <= 1e-5 * float(want.abs().max())
        assert r["summary"]["steps"] == FINETUNE_STEPS
        for layer in r["layers"]:
            assert {k: layer[k] for k in HF_MOE} == HF_MOE
            assert (layer["top_k"], layer["num_experts"], layer["normalize_topk"]) == routing
    summary = results[0]["summary"]
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.05, summary
    run = ranks["runs"] / "tiny"
    assert [d.name for d in checkpoint_dirs(run / "checkpoints")] == [f"step_{s:08d}" for s in (10, 20, 30)]
    assert (run / "straggler.jsonl").read_text().count("\n") >= FINETUNE_STEPS // 2
    rows = json.loads((run / "hf_load.json").read_text())["ranks"]
    dense, per_expert = tensor_bytes(path)
    assert [row["rank"] for row in rows] == list(range(WORLD))
    for rank, row in enumerate(rows):  # contiguous with 1 replica: EP rank 0 holds 0-3 + 4, EP rank 1 4-7 + 0
        ep_rank = rank % EP  # ranks dp*ep + e
        own = dense + sum(per_expert[e] for e in ([0, 1, 2, 3, 4] if ep_rank == 0 else [0, 4, 5, 6, 7]))
        assert own <= row["bytes_read"] <= 1.05 * own, (row, own)
        assert row["checkpoint_bytes"] == sum(f.stat().st_size for f in path.glob("*.safetensors"))
        assert row["peak_rss_bytes"] > 0


def test_finetuned_pretrained_model_resumes_at_another_layout(
    ckpts: dict[str, Path], ranks: dict, tmp_path: Path
) -> None:
    """The fine-tuned run's step-20 checkpoint (EP=2 x DP=2, one replica per rank) resumed on one rank (EP=1,
    the global batch kept by grad_accum) through the entry point (``python -m moe_dist.train``, no launcher):
    the resume self-check passes (the loaded model's val loss is the stored one) and it trains on (two steps,
    to stay cheap). The resume needs nothing of the model directory: it runs with the directory moved away
    (no shard, no config.json: the launch's shard check is skipped, the config is read from the run's
    ``hf_model/`` copy, and the log says so), and hf_load.json keeps the first start's record. Without that
    copy, the same launch is one ConfigError line."""
    from moe_dist.training.config import config_from_dict
    from tests.helpers.launch import launch, python_cmd
    from tests.helpers.shared_runs import cut_back

    shutil.copytree(ranks["runs"] / "tiny", tmp_path / "tiny")
    cut_back(tmp_path / "tiny", 20)
    train = {**FINETUNE_TRAIN, "micro_batch": 8, "steps": 22}  # world 1: the stored global batch of 4 x 2
    cfg = _hf_run(ckpts["qwen3_moe"], tmp_path, "tiny", {"ep": 1}, train)
    cfg["model"]["hf_moe"] = HF_MOE
    (tmp_path / "run.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    record = (tmp_path / "tiny" / "hf_load.json").read_text()
    aside = tmp_path / "aside"  # the model directory is away during the resume: reading it would fail
    shutil.move(ckpts["qwen3_moe"], aside)
    try:
        p = launch(python_cmd(tmp_path / "run.yaml"), timeout=400)
        bare = {**cfg, "name": "bare"}  # the same checkpoint without the run's copy of the model's files
        shutil.copytree(tmp_path / "tiny" / "checkpoints", tmp_path / "bare" / "checkpoints")
        with pytest.raises(ConfigError, match="is not a directory with a config.json") as err:
            config_from_dict(bare)
    finally:
        shutil.move(aside, ckpts["qwen3_moe"])
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-5000:])
    assert "hf_model holds no copy" in str(err.value) and "\n" not in str(err.value)
    assert f"resuming {tmp_path / 'tiny'}" in p.stderr and str(tmp_path / "tiny" / "hf_model") in p.stderr
    assert "weights not read" in p.stderr
    assert json.loads((tmp_path / "tiny" / "summary.json").read_text())["steps"] == 22
    assert (tmp_path / "tiny" / "hf_load.json").read_text() == record  # the first start's (4 rows), kept
    rows = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    checks = [r for r in rows if "resume_check" in r]
    assert len(checks) == 1 and checks[0]["resume_check"] == "pass", checks
    assert checks[0]["saved_layout"] == [WORLD, EP] and checks[0]["layout"] == [1, 1]


def _disk(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors directory, by key, as stored."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_zero_step_round_trip_is_exact(ckpts: dict[str, Path], ranks: dict, tmp_path: Path) -> None:
    """HF directory -> ``train.steps=0`` at EP=2 x DP=2 (load, evaluate, save step 0 in our format) ->
    ``python -m moe_dist.export_hf`` -> ``from_pretrained`` gives back the original tensors exactly (the same
    key set, torch.equal on every key): Qwen3-MoE per-expert and fused, each with one replica per rank,
    DeepSeek-V3 (selection bias, shared expert, a dense first layer), and a bf16 checkpoint (``--dtype auto``
    writes bf16 again). A per-expert source also comes back tensor for tensor on disk (keys, dtypes, values),
    and the source's tokenizer files are copied beside the weights."""
    from transformers import AutoModelForCausalLM

    from moe_dist.checkpoint.files import checkpoint_dirs
    from moe_dist.export_hf import main

    for name in CONVERT:
        run = ranks["runs"] / f"convert_{name}"
        summaries = [r[list(CONVERT).index(name)] for r in ranks["convert"]]
        assert [s["steps"] for s in summaries] == [0] * WORLD, name
        # evaluated, not trained
        assert summaries[0]["final_val_loss"] == summaries[0]["initial_val_loss"], name
        assert [d.name for d in checkpoint_dirs(run / "checkpoints")] == ["step_00000000"], name
        out = tmp_path / name
        main([str(run), str(out)])  # the command's own argv, in-process
        src = ckpts[name]
        want = AutoModelForCausalLM.from_pretrained(src, dtype="auto").state_dict()
        got = AutoModelForCausalLM.from_pretrained(out, dtype="auto").state_dict()
        assert sorted(got) == sorted(want), name
        for key, t in want.items():
            assert got[key].dtype == t.dtype and torch.equal(got[key], t), (name, key)
        for f in src.glob("tokenizer*"):
            assert (out / f.name).read_bytes() == f.read_bytes(), (name, f.name)
        if name != "qwen3_fused":  # transformers writes the per-expert layout: so does the export
            disk_want, disk_got = _disk(src), _disk(out)
            assert sorted(disk_got) == sorted(disk_want), name
            for key, t in disk_want.items():
                assert disk_got[key].dtype == t.dtype and torch.equal(disk_got[key], t), (name, key)
    assert (tmp_path / "qwen3_moe" / "tokenizer_config.json").is_file()  # the copy above checked something
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "qwen3_moe").iterdir()}
    # never overwritten: exit 2, one ConfigError line (test_offline_tools.py reads the line)
    assert main([str(ranks["runs"] / "convert_qwen3_moe"), str(tmp_path / "qwen3_moe")]) == 2
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "qwen3_moe").iterdir()} == before


def _val_loss(model, x, y) -> float:
    with torch.no_grad():
        logits = model(input_ids=x, use_cache=False).logits
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))


def test_pretrained_model_on_tokenized_data_trains_and_exports_after_its_directory_moved(
    ckpts: dict[str, Path], ranks: dict, tmp_path: Path
) -> None:
    """``model.hf_pretrained`` with ``data.kind: tokens`` (EP=2 x DP=2, 4 steps): the launch's check passes
    (the model directory holds the tokenizer the data was made with; its embedding holds the tokenizer's
    ids); the untrained val loss is transformers' ``from_pretrained`` model's on the same validation windows,
    one process, and val bpb is val loss x tokens per byte / ln 2. The run directory holds a copy of the
    model's config.json and tokenizer files, so with the model directory moved away the export still works:
    it carries the tokenizer, and ``from_pretrained`` on it gives the trained run's final val loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_dist.data.token_files import read_manifest
    from moe_dist.data.tokens import TokenCorpus
    from moe_dist.export_hf import main
    from moe_dist.training.config import config_from_dict
    from moe_dist.training.data_check import check_data

    cfg = config_from_dict(ranks["tokens"])
    check_data(cfg)  # as the launch does: accepted
    summary = ranks["convert"][0][-1]
    assert summary["steps"] == TOKENS_TRAIN["steps"]
    S, n = cfg.model.seq_len, TOKENS_TRAIN["val_sequences"]
    corpus = TokenCorpus.build(cfg.data, S, 0, 1, cfg.train.seed)
    x, y = corpus.sequences("val", S, cfg.train.seed, 0, range(n))  # the trainer's validation set
    src, run = ckpts["qwen3_tok"], ranks["runs"] / "tokens"
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert _val_loss(ref, x, y) == pytest.approx(summary["initial_val_loss"], rel=1e-5)
    val = read_manifest(ckpts["tokens"])["splits"]["val"]
    bpb = summary["final_val_loss"] * val["tokens"] / (math.log(2) * val["bytes"])
    assert summary["final_val_bpb"] == pytest.approx(bpb, rel=1e-12)
    rows = json.loads((run / "hf_load.json").read_text())["ranks"]
    assert len(rows) == WORLD and all(r["bytes_read"] > 0 and r["read"] for r in rows)
    names = ["config.json", "tokenizer.json", "tokenizer_config.json"]
    for name in names:
        assert (run / "hf_model" / name).read_bytes() == (src / name).read_bytes(), name
    moved = tmp_path / "moved"
    shutil.move(src, moved)
    try:
        main([str(run), str(tmp_path / "out")])
    finally:
        shutil.move(moved, src)
    out = tmp_path / "out"
    for name in names[1:]:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert len(AutoTokenizer.from_pretrained(out)) == 300
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert _val_loss(got, x, y) == pytest.approx(summary["final_val_loss"], rel=1e-5)
    assert summary["final_val_loss"] != summary["initial_val_loss"]  # it trained: not the source's weights


def test_tokenized_data_against_a_pretrained_directory_is_one_config_error(
    ckpts: dict[str, Path], tmp_path: Path
) -> None:
    """The launch's data check with ``model.hf_pretrained`` (no process group, no tensor read): a model
    whose embedding (256 rows) is smaller than the tokenizer's 300 ids, and a model directory whose tokenizer
    files differ from the ones the data was made with, are each one ConfigError line."""
    from moe_dist.training.config import config_from_dict
    from moe_dist.training.data_check import check_data

    other = tmp_path / "other"
    shutil.copytree(ckpts["qwen3_tok"], other)
    conf = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**conf, "model_max_length": 64}))
    for model, needle in (
        (ckpts["qwen3_moe"], "is larger than the model's embedding (its config's vocab_size=256)"),
        (other, "holds another tokenizer"),
    ):
        cfg = _hf_run(model, tmp_path, "refused", {"ep": EP}, TOKENS_TRAIN)
        cfg["data"] = {"kind": "tokens", "path": str(ckpts["tokens"])}
        with pytest.raises(ConfigError, match=re.escape(needle)) as err:
            check_data(config_from_dict(cfg))
        assert "\n" not in str(err.value)
