"""Trainer parts of the GPU suite: 30 bf16 steps at world 1 (NCCL on a GPU, gloo in a smoke run), resumed
bit-exact from the middle; and the throughput of a ~0.5B-parameter MoE (tokens/s, MFU, peak memory).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from profiling.bench.gpu.common import ROOT, device_for, peak_tflops

TIMING_KEYS = ("step_time", "tokens_per_s", "tflops", "resume_check")
"""metrics.jsonl keys that measure the clock, not the numbers: left out of the bit-exact comparison."""



def suite_model(smoke: bool) -> dict:
    """The small MoE LM of the suite's trainer parts (``model:`` of a run config)."""
    return {
        "d_model": 64 if smoke else 256,
        "n_layers": 2,
        "n_heads": 2 if smoke else 4,
        "seq_len": 32 if smoke else 256,
        "d_ff_dense": 128,
        "moe": {
            "num_experts": 4 if smoke else 8,
            "top_k": 2,
            "d_ff": 64 if smoke else 512,
            "activation": "swiglu",
            "aux_loss_coef": 0.01,
        },
    }


def run_config(name: str, out_dir: Path, smoke: bool, model: dict, train: dict) -> dict:
    """A run config for ``python -m moe_dist.train``: synthetic bytes, EP 1, bf16 on the GPU."""
    return {
        "name": name,
        "out_dir": str(out_dir),
        "model": model,
        "parallel": {"ep": 1, "backend": "gloo" if smoke else "nccl", "timeout_s": 120},
        "data": {"kind": "synthetic", "max_bytes": 400_000},
        "train": {"bf16": True, "retain_host_memory": False, "log_every": 1, **train},
        "optim": {"warmup_steps": 5},
    }


def train_subprocess(cfg_path: Path, overrides: list[str], timeout: float) -> None:
    """``python -m moe_dist.train CONFIG ...`` as a world of one, from the checkout."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
    }
    proc = subprocess.run(
        [sys.executable, "-m", "moe_dist.train", str(cfg_path), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"train exited {proc.returncode}: {proc.stderr[-1500:]}")


def numeric_rows(run_dir: Path, drop: tuple[str, ...] = TIMING_KEYS) -> dict[int, dict]:
    """metrics.jsonl training rows by step, without the keys in ``drop`` (by default the timing keys)."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            rows[rec["step"]] = {k: v for k, v in rec.items() if k not in drop}
    return rows


def trainer_resume(smoke: bool, out: Path) -> dict:
    """30 steps (4 in a smoke run) with a checkpoint in the middle; a copy of the run with its last
    checkpoint removed resumes from the middle one. Its rows must equal the first run's, bit for bit. On a
    GPU a second fresh run says whether the run is deterministic at all (a resume cannot beat that)."""
    device_for(smoke)  # a full run without a GPU stops here with one line
    steps = 4 if smoke else 30
    model = suite_model(smoke)
    train = {
        "steps": steps,
        "micro_batch": 4 if smoke else 8,
        "eval_every": steps // 2,
        "val_sequences": 16,
        "ckpt_every": steps // 2,
    }
    work = out / "trainer_resume_runs"
    shutil.rmtree(work, ignore_errors=True)
    cfg_path = work / "run.yaml"
    work.mkdir(parents=True)
    cfg_path.write_text(yaml.safe_dump(run_config("resume", work / "a", smoke, model, train)))
    train_subprocess(cfg_path, [], 300)
    first = numeric_rows(work / "a" / "resume")
    shutil.copytree(work / "a", work / "b")
    shutil.rmtree(work / "b" / "resume" / "checkpoints" / f"step_{steps:08d}")
    train_subprocess(cfg_path, [f"out_dir={work / 'b'}"], 300)
    resumed = numeric_rows(work / "b" / "resume")
    res: dict = {"steps": steps, "resumed_from": steps // 2, "rows": len(resumed)}
    diff = [s for s in first if first[s] != resumed.get(s)]
    res["differing_steps"] = diff[:10]
    res["checks"] = {"all_rows": sorted(first) == list(range(steps)), "resume_bit_exact": not diff}
    if not smoke:
        train_subprocess(cfg_path, [f"out_dir={work / 'c'}"], 300)
        again = numeric_rows(work / "c" / "resume")
        res["deterministic"] = again == first
    shutil.rmtree(work, ignore_errors=True)  # checkpoints: MBs that the report does not need
    return res


def model_flops_per_token(model: dict) -> tuple[int, int, float]:
    """(total params, active params, training FLOPs per token): 6 x active matmul params + attention's
    12 x layers x d_model x seq_len (QK^T and AV, forward + backward; causal masking not subtracted)."""
    D, Lyr, S, m = model["d_model"], model["n_layers"], model["seq_len"], model["moe"]
    E, K, Fd = m["num_experts"], m["top_k"], m["d_ff"]
    attn, expert = 4 * D * D, 3 * D * Fd  # SwiGLU expert: W1 [D, 2F], W2 [F, D]
    total = Lyr * (attn + E * expert + D * E) + 2 * 256 * D
    active = Lyr * (attn + K * expert + D * E) + 256 * D  # the output head; the embedding is a lookup
    return total, active, 6 * active + 12 * Lyr * D * S


def trainer_bench(smoke: bool, out: Path) -> dict:
    """Tokens/s, MFU (against the measured matmul peak) and peak memory of a ~0.5B-parameter MoE, in this
    process (so that torch.cuda.max_memory_allocated sees the run)."""
    device = device_for(smoke)
    peak = peak_tflops(out, device, smoke)
    if smoke:
        model = {
            "d_model": 64,
            "n_layers": 2,
            "n_heads": 2,
            "seq_len": 64,
            "d_ff_dense": 128,
            "moe": {"num_experts": 4, "top_k": 2, "d_ff": 64, "activation": "swiglu"},
        }
        train = {"steps": 4, "micro_batch": 4}
    else:
        model = {
            "d_model": 1024,
            "n_layers": 8,
            "n_heads": 16,
            "seq_len": 1024,
            "d_ff_dense": 4096,
            "moe": {"num_experts": 16, "top_k": 2, "d_ff": 1280, "activation": "swiglu"},
        }
        train = {"steps": 30, "micro_batch": 16}
    model["moe"]["aux_loss_coef"] = 0.01
    train.update(eval_every=10_000, val_sequences=8, ckpt_every=0)
    work = out / "trainer_bench_run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg_path = work / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(run_config("bench", work, smoke, model, train)))
    from moe_dist.train import main

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    main([str(cfg_path)])
    rows = [r for s, r in sorted(numeric_rows(work / "bench", drop=()).items()) if s >= train["steps"] // 3]
    tok_s = statistics.median(r["tokens_per_s"] for r in rows)
    total, active, flops_tok = model_flops_per_token(model)
    achieved = tok_s * flops_tok / 1e12
    res = {
        "params": total,
        "active_params": active,
        "tokens_per_step": train["micro_batch"] * model["seq_len"],
        "tokens_per_s": tok_s,
        "model_tflops": achieved,
        "peak_tflops": peak,
        "mfu": achieved / peak,
        "trainer_tflops": statistics.median(r.get("tflops", 0.0) for r in rows),
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "checks": {},
    }
    shutil.rmtree(work, ignore_errors=True)
    return res
