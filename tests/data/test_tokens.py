"""Tokenized data (issue 24, item 3): ``python -m moe_dist.prepare_data`` and ``data.kind: tokens``.

The oracle for prepare_data is the tokenizer itself, applied document by document here, with the split hash
written out again from its definition (blake2b-64 of the UTF-8 text < val_fraction x 2^64). The fixtures are
made in the tests: a byte-level BPE trained with ``tokenizers`` on this interpreter's standard library and
saved as a ``PreTrainedTokenizerFast``, and .jsonl/.txt inputs cut from the same source.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from moe_dist.data import prepare as prepare_mod  # noqa: E402
from moe_dist.data.config import DataConfig  # noqa: E402
from moe_dist.data.files import DataError  # noqa: E402
from moe_dist.data.prepare import prepare  # noqa: E402
from moe_dist.data.token_files import read_manifest, token_dtype  # noqa: E402
from moe_dist.data.tokens import TokenCorpus  # noqa: E402
from moe_dist.errors import ConfigError  # noqa: E402
from moe_dist.training.config import config_from_dict  # noqa: E402
from moe_dist.training.data_check import check_data  # noqa: E402
from tests.helpers.launch import child_env, launch, python_cmd, run_ranks  # noqa: E402
from tests.training.train_workers import tiny, train_worker  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["abc", "bisect", "calendar", "colorsys", "copy", "dataclasses", "fractions", "heapq", "queue"]
VAL_FRACTION = 0.2
CHUNK = 16 << 10  # several .jsonl pieces from a ~100 kB input


def save_tokenizer(out: Path, texts: list[str], vocab: int, eos: str | None = "<|eos|>") -> Path:
    """A byte-level BPE trained on ``texts``, saved as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[eos] if eos else [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tokens")
    sources = [(STDLIB / f"{m}.py").read_text() for m in MODULES]
    tok_dir = save_tokenizer(root / "tok", sources[:4], vocab=400)
    docs = [s[i : i + 1500] for s in sources for i in range(0, len(s), 1500)][:80]
    jsonl = root / "a.jsonl"
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)]
    jsonl.write_text("\n".join(lines[:40]) + "\n\n" + "\n".join(lines[40:]) + "\n")  # a blank line is skipped
    txts = []
    for i, m in enumerate(("keyword", "this")):
        p = root / f"{i}.txt"
        p.write_text((STDLIB / f"{m}.py").read_text())
        txts.append(p)
    inputs = [str(jsonl), *map(str, txts)]
    a = root / "a"
    first = prepare(str(tok_dir), a, inputs, val_fraction=VAL_FRACTION, chunk_bytes=CHUNK, progress=False)
    return {"root": root, "tok": tok_dir, "docs": docs, "inputs": inputs, "a": a, "first": first}


def oracle(tok_dir: Path, texts: list[str]) -> tuple[dict[str, list[int]], dict[str, int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ids: dict[str, list[int]] = {"train": [], "val": []}
    nbytes = {"train": 0, "val": 0}
    for text in texts:
        h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
        split = "val" if h < VAL_FRACTION * 2**64 else "train"
        ids[split] += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        nbytes[split] += len(text.encode())
    return ids, nbytes


def outputs(d: Path) -> dict[str, bytes]:
    return {n: (d / n).read_bytes() for n in ("train.bin", "val.bin", "manifest.json")}


def test_prepare_matches_the_tokenizer_and_is_the_same_with_2_processes(fx: dict) -> None:
    """The token files are each document's ids + EOS in input order, split by the text's hash; the
    manifest's counts add up; the command line with 2 processes writes the same bytes; a second run with
    the same inputs does nothing."""
    texts = fx["docs"] + [Path(p).read_text() for p in fx["inputs"][1:]]
    ids, nbytes = oracle(fx["tok"], texts)
    m = read_manifest(fx["a"])
    assert fx["first"].tokenized > 3 and m["dtype"] == "uint16"  # several .jsonl pieces
    for split in ("train", "val"):
        got = np.fromfile(fx["a"] / f"{split}.bin", dtype="<u2")
        assert got.tolist() == ids[split], split
        assert (
            m["splits"][split]["tokens"] == len(ids[split]) and m["splits"][split]["bytes"] == nbytes[split]
        )
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == len(texts)
    assert 0 < m["splits"]["val"]["documents"] < len(texts) / 2
    assert not (fx["a"] / "parts").exists()
    b = fx["root"] / "b"
    cmd = [sys.executable, "-m", "moe_dist.prepare_data", "--tokenizer", str(fx["tok"]), "--out", str(b)]
    cmd += [*fx["inputs"], "--val-fraction", str(VAL_FRACTION), "--chunk-mb", str(CHUNK / (1 << 20))]
    launch([*cmd, "--processes", "2"], check=True, timeout=120)
    assert outputs(b) == outputs(fx["a"])
    again = prepare(str(fx["tok"]), fx["a"], fx["inputs"], val_fraction=VAL_FRACTION, chunk_bytes=CHUNK)
    assert again.tokenized == 0 and again.reused == fx["first"].tokenized


def test_an_interrupted_prepare_resumes_without_redoing_finished_pieces(
    fx: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "c"
    real, calls = prepare_mod.tokenize_piece, []

    def dies_on_the_third(job):
        calls.append(job[0].key)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a Ctrl-C or a kill between two pieces
        return real(job)

    monkeypatch.setattr(prepare_mod, "tokenize_piece", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        prepare(
            str(fx["tok"]), out, fx["inputs"], val_fraction=VAL_FRACTION, chunk_bytes=CHUNK, progress=False
        )
    monkeypatch.setattr(prepare_mod, "tokenize_piece", real)
    with pytest.raises(DataError, match="unfinished preparation"):
        read_manifest(out)
    finished = {p: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    assert len(finished) == 2 * 3  # two pieces: their train, val and json files
    (out / "parts" / "junk.train.bin.tmp").write_bytes(b"half")  # a part killed while being written
    resumed = prepare(
        str(fx["tok"]), out, fx["inputs"], val_fraction=VAL_FRACTION, chunk_bytes=CHUNK, keep_parts=True
    )
    assert (resumed.tokenized, resumed.reused) == (fx["first"].tokenized - 2, 2)
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # not rewritten
    assert not list((out / "parts").glob("*.tmp"))
    assert outputs(out) == outputs(fx["a"])


def test_uint32_when_the_vocabulary_does_not_fit_uint16(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    assert (token_dtype(1 << 16), token_dtype((1 << 16) + 1)) == ("uint16", "uint32")
    vocab = {f"w{i}": i for i in range(70_000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1").save_pretrained(str(tmp_path / "tok"))
    (tmp_path / "d.txt").write_text("w69999 w65536 w7 w65535")
    prepare(str(tmp_path / "tok"), tmp_path / "out", [str(tmp_path / "d.txt")], val_fraction=0.0)
    assert read_manifest(tmp_path / "out")["dtype"] == "uint32"
    assert np.fromfile(tmp_path / "out" / "train.bin", dtype="<u4").tolist() == [69999, 65536, 7, 65535, 1]


def test_the_global_batch_is_the_same_at_world_1_2_and_4(fx: dict) -> None:
    """Each rank's micro-batches, put together, are the same global batch at every world size; every window
    is a slice of the token file, read through a memory map."""
    cfg, S, gb = DataConfig(kind="tokens", path=str(fx["a"])), 32, 8
    train = np.fromfile(fx["a"] / "train.bin", dtype="<u2").astype(np.int64)
    batches = {}
    for world in (1, 2, 4):
        ranks = [TokenCorpus.build(cfg, S, r, world, 0) for r in range(world)]
        assert all(isinstance(c.splits["train"], np.memmap) for c in ranks)
        for step in (0, 7):
            got = [
                ranks[r].batch("train", gb // world // 2, S, 0, r, step, m)
                for m in range(2)
                for r in range(world)
            ]
            batches[world, step] = (np.concatenate([x for x, _ in got]), np.concatenate([y for _, y in got]))
    for step in (0, 7):
        x, y = batches[1, step]
        assert all(
            np.array_equal(batches[w, step][0], x) and np.array_equal(batches[w, step][1], y) for w in (2, 4)
        )
        assert np.array_equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y, strict=True):
            hits = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(train, S) == row_x, axis=1))
            assert any(train[h + S] == row_y[-1] for h in hits)
    assert not np.array_equal(batches[1, 0][0], batches[1, 7][0])


def test_a_tokens_run_on_2_ranks_writes_val_bpb_by_the_formula(fx: dict, tmp_path: Path) -> None:
    """EP=2 on 2 ranks, 3 steps: the byte LM's embedding has the tokenizer's rows, and every val_bpb (metrics
    and summary) is val loss x val tokens / (ln 2 x val bytes) of the manifest."""
    cfg = tiny(
        out_dir=str(tmp_path),
        name="tok",
        parallel={"ep": 2},
        data={"kind": "tokens", "path": str(fx["a"])},
        train={"steps": 3, "eval_every": 3, "micro_batch": 2, "val_sequences": 8},
    )
    summary = run_ranks(train_worker, 2, cfg, timeout=240)[0]
    val = read_manifest(fx["a"])["splits"]["val"]
    rows = [json.loads(line) for line in (tmp_path / "tok" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 3]
    for r in evals:
        assert r["val_bpb"] == pytest.approx(
            r["val_loss"] * val["tokens"] / (math.log(2) * val["bytes"]), rel=1e-12
        )
    assert summary["final_val_bpb"] == evals[-1]["val_bpb"]
    assert yaml.safe_load((tmp_path / "tok" / "config.yaml").read_text())["model"]["vocab_size"] == 400
    _resume_on_other_data(fx, cfg, tmp_path)


def _resume_on_other_data(fx: dict, cfg: dict, tmp_path: Path) -> None:
    """The run's checkpoint records its data's tokenizer; the launch's checks before any process group (the
    data check, then the preflight) on a resume with other data. Another tokenizer of the same vocabulary
    (400 ids: a copy of the run's with one setting changed, so that the data check alone lets it through)
    is one ConfigError line naming both hashes; the run's data at another path (continued training on new
    data) resumes with a warning naming data.path; a checkpoint without the record (older) resumes with a
    warning."""
    from moe_dist.checkpoint.files import checkpoint_dirs
    from moe_dist.training.preflight import preflight

    ckpt = checkpoint_dirs(tmp_path / "tok" / "checkpoints")[-1]
    made = read_manifest(fx["a"])["tokenizer"]
    manifest = json.loads((ckpt / "manifest.json").read_text())
    want = {"name": made["name"], "hash": made["hash"]}
    assert manifest["data"] == {"kind": "tokens", "path": str(fx["a"]), "tokenizer": want}
    other_tok = tmp_path / "other_tok"
    shutil.copytree(fx["tok"], other_tok)
    conf = json.loads((other_tok / "tokenizer_config.json").read_text())
    (other_tok / "tokenizer_config.json").write_text(json.dumps({**conf, "model_max_length": 64}))
    other = prepare(str(other_tok), tmp_path / "other", fx["inputs"][1:], val_fraction=0.5, progress=False)
    new = other.manifest["tokenizer"]
    assert new["vocab_size"] == made["vocab_size"] == 400 and new["hash"] != made["hash"]
    shutil.copytree(fx["a"], tmp_path / "moved")

    def launch_checks(path: Path) -> list[str]:
        run = config_from_dict({**cfg, "data": {"kind": "tokens", "path": str(path)}})
        check_data(run)
        handler = _Records()
        logging.getLogger("moe_dist.train").addHandler(handler)
        try:
            preflight(run, 2, 0)
        finally:
            logging.getLogger("moe_dist.train").removeHandler(handler)
        return handler.lines

    with pytest.raises(ConfigError) as err:
        launch_checks(tmp_path / "other")
    line = str(err.value)
    assert made["hash"][:12] in line and new["hash"][:12] in line and "\n" not in line
    assert any("data.path" in w and "moved" in w for w in launch_checks(tmp_path / "moved"))
    del manifest["data"]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))  # as a checkpoint from before the record
    assert any("does not record the tokenizer" in w for w in launch_checks(tmp_path / "other"))


class _Records(logging.Handler):
    """The warnings a logger emitted (the preflight's), as lines."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


PREPARE_REFUSALS = {
    "missing tokenizer": ({"tok_dir": "nope"}, "is not a directory"),
    "no tokenizer files": ({"tok_dir": "."}, "holds no tokenizer files"),
    "no inputs": ({"inputs": []}, "no inputs"),
    "jsonl without the field": ({"field": "body"}, "has no 'body' field"),
    "unknown kind": ({"inputs": ["x.csv"]}, "unknown kind '.csv'"),
    "missing input": ({"inputs": ["gone.txt"]}, "no such file"),
    "bad val fraction": ({"val_fraction": 1.0}, "--val-fraction must be in"),
    "not JSON": ({"inputs": ["bad.jsonl"]}, "is not JSON"),
    "empty inputs": ({"inputs": ["empty.txt"]}, "hold no documents"),
    "someone else's out": ({"out": "."}, "is not a prepare_data directory"),
    "another job's out": ({"out": "a"}, "prepared from other inputs"),
    "no EOS": ({"tok_dir": "noeos"}, "has no EOS token"),
}


@pytest.mark.parametrize("case", list(PREPARE_REFUSALS))
def test_prepare_refuses_bad_input_in_one_line(case: str, fx: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.csv").write_text("a,b\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    (tmp_path / "empty.txt").write_text("")
    if case == "no EOS":
        save_tokenizer(tmp_path / "noeos", ["abc abd"], vocab=270, eos=None)
    args = {"tok_dir": str(fx["tok"]), "out": tmp_path / "new", "inputs": fx["inputs"][:1], "field": "text"}
    args["val_fraction"] = VAL_FRACTION
    change, needle = PREPARE_REFUSALS[case]
    args.update(change)
    if case == "another job's out":
        args["out"] = fx["a"]
    with pytest.raises(DataError, match=needle) as e:
        prepare(args.pop("tok_dir"), args.pop("out"), args.pop("inputs"), progress=False, **args)
    assert "\n" not in str(e.value)
    assert (fx["a"] / "manifest.json").is_file()  # the other job's directory is untouched


def test_overwrite_replaces_another_jobs_directory(fx: dict, tmp_path: Path) -> None:
    out = tmp_path / "d"
    prepare(str(fx["tok"]), out, fx["inputs"][1:], val_fraction=VAL_FRACTION, progress=False)
    prepare(str(fx["tok"]), out, fx["inputs"][2:], val_fraction=VAL_FRACTION, overwrite=True, progress=False)
    assert read_manifest(out)["inputs"] == fx["inputs"][2:]


HOLD_LOCK = (
    "import sys, time; from pathlib import Path; from moe_dist.data.prepare import exclusive\n"
    "with exclusive(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)"
)
"""A prepare_data run as far as the lock goes: holds DATA_DIR's lock until killed."""


def test_a_second_prepare_on_a_directory_in_use_is_refused_and_a_killed_ones_lock_blocks_nothing(
    fx: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """While another process holds DATA_DIR's lock (as a running prepare_data does), ``prepare-data`` on the
    same directory is one DataError line naming it (exit 2) and writes nothing there. Once that process is
    SIGKILLed (no clean-up: its lock file stays) the kernel has dropped its lock, and the same command
    prepares the directory."""
    import subprocess

    from moe_dist.prepare_data import main

    out = tmp_path / "d"
    out.mkdir()
    argv = ["--tokenizer", str(fx["tok"]), "--out", str(out), *fx["inputs"][1:]]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], env=child_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--out {out} is being prepared by another" in err, err
        assert [p.name for p in out.iterdir()] == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    assert holder.returncode == -9 and (out / ".lock").is_file()
    assert main(argv) == 0
    assert read_manifest(out)["inputs"] == fx["inputs"][1:]


def _hf_dir(path: Path, vocab: int) -> Path:
    from transformers import AutoConfig

    fields = dict(hidden_size=16, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=1)
    fields.update(num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    AutoConfig.for_model("qwen3_moe", vocab_size=vocab, **fields).save_pretrained(str(path))
    return path


def test_launch_refusals_are_one_config_error_line(fx: dict, tmp_path: Path) -> None:
    """Each refusal of the data against the model, before any process group (check_data, as train.py calls
    it); the last one through the real entry point: exit 2, one line, nothing written."""
    toks = {"kind": "tokens", "path": str(fx["a"])}
    other = save_tokenizer(_hf_dir(tmp_path / "other", 512), ["different text entirely"], vocab=300)
    _hf_dir(tmp_path / "same", 512)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "same" / name).write_bytes((fx["tok"] / name).read_bytes())
    empty = tmp_path / "empty"
    (tmp_path / "e.txt").write_text("one lonely document")  # lands in val at val_fraction 0.999 (asserted)
    prepare(str(fx["tok"]), empty, [str(tmp_path / "e.txt")], val_fraction=0.999, progress=False)
    assert read_manifest(empty)["splits"]["train"]["tokens"] == 0
    noval = tmp_path / "noval"
    prepare(str(fx["tok"]), noval, [str(tmp_path / "e.txt")], val_fraction=0.0, progress=False)
    cut = tmp_path / "cut"
    shutil.copytree(fx["a"], cut)
    with open(cut / "train.bin", "r+b") as f:
        f.truncate(100)  # a copy that lost its tail
    cases = [
        ({"data": {"kind": "tokens", "path": str(cut)}}, "train.bin holds 100 bytes, the manifest says"),
        (
            {"data": toks, "model": {"kind": "hf", "hf_config": str(_hf_dir(tmp_path / "small", 300))}},
            "is larger than the model's embedding (its config's vocab_size=300)",
        ),
        ({"data": toks, "model": {"kind": "hf", "hf_config": str(other)}}, "holds another tokenizer"),
        ({"data": {"kind": "tokens", "path": str(empty)}}, "the dataset is empty"),
        ({"data": {"kind": "tokens", "path": str(noval)}}, "its val split holds no tokens"),
        ({"data": toks, "model": {"seq_len": 100_000}}, "too few for sequences of 100000"),
        ({"data": {"kind": "tokens", "path": str(tmp_path)}}, "is not a prepared token directory"),
        ({"data": toks, "model": {"vocab_size": 300}}, "model.vocab_size=300 is smaller than"),
        (
            {"model": {"kind": "hf", "hf_config": str(_hf_dir(tmp_path / "tiny", 200))}},
            "the byte corpus's 256",
        ),
    ]
    for sections, needle in cases:
        cfg = config_from_dict(tiny(**sections))
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")) as e:
            check_data(cfg)
        assert "\n" not in str(e.value)
    ok = config_from_dict(tiny(data=toks, model={"kind": "hf", "hf_config": str(tmp_path / "same")}))
    check_data(ok)  # the same tokenizer files: accepted
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            tiny(
                out_dir=str(tmp_path / "runs"), **next(c for c, n in cases if n == "holds another tokenizer")
            )
        )
    )
    p = launch(python_cmd(cfg), env=child_env(WORLD_SIZE="2", RANK="0"), timeout=120)
    assert p.returncode == 2 and "holds another tokenizer" in p.stderr, p.stderr[-2000:]
    assert len([line for line in p.stderr.splitlines() if "ConfigError" in line]) == 1
    assert not (tmp_path / "runs").exists()


def test_a_repeated_input_is_tokenized_once(fx: dict, tmp_path: Path) -> None:
    """The same content twice: one worker tokenizes each piece once (2 processes: no two write one part),
    and the output holds it twice."""
    one = prepare(
        str(fx["tok"]), tmp_path / "one", fx["inputs"][:1], val_fraction=VAL_FRACTION, chunk_bytes=CHUNK
    )
    two = prepare(
        str(fx["tok"]),
        tmp_path / "two",
        fx["inputs"][:1] * 2,
        val_fraction=VAL_FRACTION,
        chunk_bytes=CHUNK,
        processes=2,
    )
    assert two.tokenized == one.tokenized and two.reused == one.tokenized
    for split in ("train.bin", "val.bin"):
        assert (tmp_path / "two" / split).read_bytes() == (tmp_path / "one" / split).read_bytes() * 2


def test_a_checkpoint_from_before_model_vocab_size_resumes_as_bytes() -> None:
    """Checkpoints written before the key trained a 256-byte embedding: the resolved byte run is no change,
    a tokenizer's vocabulary a refused model change."""
    import copy

    from moe_dist.training.data_check import resolve_vocab
    from moe_dist.training.preflight import config_changes

    now = config_from_dict(tiny(data={"kind": "stdlib"}))
    resolve_vocab(now)
    saved = copy.deepcopy(now.to_dict())
    del saved["model"]["vocab_size"]
    assert now.model.vocab_size == 256 and config_changes(saved, now.to_dict()) == ([], [])
    other = config_from_dict(tiny(model={"vocab_size": 400}))
    assert config_changes(saved, other.to_dict())[0] == ["model.vocab_size: 256 -> 400"]


def test_the_planner_sizes_the_embedding_by_the_tokenizer(fx: dict, capsys: pytest.CaptureFixture) -> None:
    """``moe-dist plan`` on tokens data counts the embedding and head at the tokenizer's vocabulary (400 ids
    here), as the launch builds them, not the byte LM's 256."""
    from moe_dist.plan import main as plan_main
    from moe_dist.training.config import load_config
    from moe_dist.training.memory import plan

    args = ["configs/cpu_demo.yaml", "--world", "2", "--ep", "2", "--dtype", "fp32", "--json"]
    assert plan_main([*args, "data.kind=tokens", f"data.path={fx['a']}"]) == 0
    got = json.loads(capsys.readouterr().out)
    vocab = json.loads((fx["a"] / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    want = plan(load_config("configs/cpu_demo.yaml", [f"model.vocab_size={vocab}"]), 2, 2, dtype="fp32")
    assert vocab != 256 and got["params"] == want.params
    assert got["params"] > plan(load_config("configs/cpu_demo.yaml", []), 2, 2, dtype="fp32").params
