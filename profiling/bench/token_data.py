"""Tokenized data: prepare_data's throughput with 1 and 2 processes, and the per-rank memory of
``data.kind: tokens`` against ``stdlib`` on about the same number of tokens.

    python -m profiling.bench.token_data --work WORK_DIR [--copies 3] [--steps 20]

All offline: a byte-level BPE (``--vocab``) is trained with ``tokenizers`` on the first ``--train-mb`` of this
interpreter's standard library; the inputs are that library as one .jsonl (a document per file).

Throughput: ``prepare`` on the first ``--throughput-mb`` of it: the wall time of the whole call (hashing, the
pool, the concatenation; transformers is imported before) and its CPU seconds, the workers' included.

Memory: the whole library repeated ``--copies`` times (tokenized once: a repeated piece is reused) gives a
token file of about as many tokens as the ``stdlib`` corpus has bytes; then, per data kind, (a) a fresh
process that imports torch, builds rank 0's corpus of 2 and draws ``--batches`` batches of 8 x 128 (VmRSS,
RssAnon, RssFile, VmHWM before and after), and (b) a 2-rank EP=2 trainer run of ``--steps`` steps under
torchrun (every kind with the tokenizer's vocabulary as model.vocab_size), whose summary.json
``memory_per_rank.peak_rss`` is the largest rank's peak. Writes WORK_DIR/token_data.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import yaml

log = logging.getLogger("moe_dist.bench")

CORPUS_PROBE = r"""
import json, sys
def status():
    f = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)
    return {k: int(f[k].split()[0]) * 1024 for k in ('VmRSS', 'RssAnon', 'RssFile', 'VmHWM')}
import torch
from moe_dist.data.config import DataConfig
from moe_dist.data.kinds import build_corpus
before = status()
cfg = DataConfig(**json.loads(sys.argv[1]))
corpus = build_corpus(cfg, 128, 0, 2, 0)
for step in range(int(sys.argv[2])):
    corpus.batch('train', 8, 128, 0, 0, step, 0)
print(json.dumps({'before': before, 'after': status(), 'description': corpus.description}))
"""


def stdlib_jsonl(path: Path, limit_bytes: int = 0) -> int:
    """The standard library's .py files (as the stdlib corpus reads them), one JSON document each."""
    from moe_dist.data.files import stdlib_files

    _, files = stdlib_files()
    total = 0
    with open(path, "w") as f:
        for p in files:
            text = p.read_bytes().decode("utf-8", errors="replace")
            f.write(json.dumps({"text": text}) + "\n")
            total += len(text.encode())
            if limit_bytes and total >= limit_bytes:
                break
    return total


def train_tokenizer(out: Path, vocab: int, train_bytes: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from moe_dist.data.files import stdlib_files

    texts, total = [], 0
    for p in stdlib_files()[1]:
        texts.append(p.read_bytes().decode("utf-8", errors="replace"))
        total += len(texts[-1])
        if total >= train_bytes:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(out))


def _children_cpu() -> float:
    """CPU seconds of the finished pool workers (a load-independent cost beside the wall time)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def corpus_memory(data: dict, batches: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-c", CORPUS_PROBE, json.dumps(data), str(batches)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=1800,
    )
    return json.loads(p.stdout.strip().splitlines()[-1])


def trainer_peak_rss(work: Path, name: str, data: dict, steps: int, vocab: int) -> dict:
    """Why one vocab for every kind: the logits (micro_batch x seq_len x vocab) dominate a tiny model's
    memory; with the tokenizer's vocab everywhere, the runs differ in their data only."""
    cfg = {
        "name": name,
        "out_dir": str(work / "runs"),
        "model": {
            "d_model": 64,
            "n_layers": 2,
            "n_heads": 2,
            "seq_len": 128,
            "vocab_size": vocab,
            "d_ff_dense": 128,
            "moe": {"num_experts": 4, "top_k": 2, "d_ff": 64},
        },
        "parallel": {"ep": 2, "backend": "gloo"},
        "data": data,
        "train": {"steps": steps, "micro_batch": 8, "eval_every": steps, "val_sequences": 16, "log_every": 5},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    from moe_dist.runtime.net import free_port

    cmd = [
        "torchrun",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "moe_dist.train",
        str(path),
    ]
    t0 = time.perf_counter()
    subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True, timeout=1800
    )
    summary = json.loads((work / "runs" / name / "summary.json").read_text())
    return {"peak_rss": summary["memory_per_rank"]["peak_rss"], "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m profiling.bench.token_data")
    p.add_argument("--work", required=True, help="a scratch directory (tokenizer, data, runs)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--train-mb", type=float, default=3.0, help="stdlib text the BPE is trained on")
    p.add_argument("--throughput-mb", type=float, default=6.0)
    p.add_argument("--copies", type=int, default=3)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip-memory", action="store_true", help="the throughput part only")
    p.add_argument("--skip-throughput", action="store_true", help="the memory part only")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from moe_dist.data.prepare import cached_tokenizer, prepare

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = work / "tok"
    if not (tok / "tokenizer.json").is_file():
        train_tokenizer(tok, a.vocab, int(a.train_mb * 1e6))
    out: dict = {"python_stdlib": sysconfig.get_paths()["stdlib"], "load_avg_start": os.getloadavg()}
    small = work / "small.jsonl"
    small_bytes = stdlib_jsonl(small, int(a.throughput_mb * 1e6))
    cached_tokenizer(str(tok))  # why first: the timed runs should not include importing transformers
    for procs in () if a.skip_throughput else (1, 2):
        shutil.rmtree(work / f"tp{procs}", ignore_errors=True)
        cpu0 = time.process_time() + _children_cpu()
        r = prepare(
            str(tok), work / f"tp{procs}", [str(small)], processes=procs, chunk_bytes=1 << 20, progress=False
        )
        tokens = sum(r.manifest["splits"][s]["tokens"] for s in ("train", "val"))
        cpu = time.process_time() + _children_cpu() - cpu0
        out[f"prepare_{procs}p"] = {
            "text_bytes": small_bytes,
            "tokens": tokens,
            "seconds": r.seconds,
            "mb_per_s": small_bytes / 1e6 / r.seconds,
            "cpu_seconds": cpu,
            "mb_per_cpu_s": small_bytes / 1e6 / cpu,
        }
    if a.skip_memory:
        (work / "token_data_throughput.json").write_text(json.dumps(out, indent=1))
        for procs in (1, 2):
            log.info("prepare_data, %d process(es): %s", procs, out[f"prepare_{procs}p"])
        return
    full = work / "stdlib.jsonl"
    stdlib_jsonl(full)
    big = work / "big"
    r = prepare(str(tok), big, [str(full)] * a.copies, processes=2, progress=False)
    out["token_file"] = {k: r.manifest["splits"][k] for k in ("train", "val")}
    out["token_file"]["dtype"] = r.manifest["dtype"]
    kinds = {
        "synthetic (baseline)": {"kind": "synthetic", "max_bytes": 200_000},
        "stdlib": {"kind": "stdlib"},
        "tokens": {"kind": "tokens", "path": str(big)},
    }
    for label, data in kinds.items():
        out[label] = {"corpus": corpus_memory(data, a.batches)}
        out[label]["trainer"] = trainer_peak_rss(
            work, label.split()[0], data, a.steps, r.manifest["tokenizer"]["vocab_size"]
        )
    out["load_avg_end"] = os.getloadavg()
    (work / "token_data.json").write_text(json.dumps(out, indent=1))
    mb = 1 << 20
    lines = [
        "| data.kind | corpus | +RSS (MiB) | +RssAnon | +RssFile | +peak (VmHWM) | trainer peak RSS/rank |",
        "|---|---|---|---|---|---|",
    ]
    for label in kinds:
        c, t = out[label]["corpus"], out[label]["trainer"]
        d = {k: (c["after"][k] - c["before"][k]) / mb for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}
        lines.append(
            f"| {label} | {c['description']} | {d['VmRSS']:.0f} | {d['RssAnon']:.0f} | "
            f"{d['RssFile']:.0f} | {d['VmHWM']:.0f} | {t['peak_rss'] / mb:.0f} |"
        )
    for procs in () if a.skip_throughput else (1, 2):
        q = out[f"prepare_{procs}p"]
        lines.append(
            f"prepare_data, {procs} process(es): {q['text_bytes'] / 1e6:.1f} MB of text, {q['tokens']} "
            f"tokens in {q['seconds']:.1f} s = {q['mb_per_s']:.2f} MB/s ({q['cpu_seconds']:.1f} CPU s, "
            f"{q['mb_per_cpu_s']:.2f} MB per CPU s)"
        )
    print("\n".join(lines))  # noqa: T201 - the bench's table


if __name__ == "__main__":
    main()
