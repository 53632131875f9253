"""Rank-side body of the ``engine: fsdp`` tests: several training runs in one launch, each reporting its
model and AdamW state in the global (per-expert) view, as the checkpoint files hold it."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from moe_dist.checkpoint.global_state import split_model
from moe_dist.moe.parallel import ParallelLayout
from moe_dist.training.config import config_from_dict
from tests.helpers.shared_runs import cut_back


def global_state(trainer) -> dict:
    """The model's tensors and AdamW state by global name (experts by id: this EP rank's), full tensors
    under either engine (a collective under fsdp: every rank calls it)."""
    dense, experts = split_model(trainer.model)
    contrib = trainer.engine.checkpoint_state()
    opt = {**contrib.dense["optimizer"], **contrib.experts["optimizer"]}
    moments = {k: (st["exp_avg"], st["exp_avg_sq"]) for k, st in opt.items()}
    return {"params": {**dense, **experts}, "moments": moments}


def runs_worker(rank: int, world: int, runs: list[tuple[dict, tuple | None, str]]) -> list[dict]:
    """Each run (config, prep, dtype) in turn in the same ranks. ``prep`` ("resume", src, step) first makes
    the run directory a copy of run ``src`` cut back to its checkpoint of ``step``. Returns per run the
    summary and ``global_state`` at the end."""
    from moe_dist.training.trainer import Trainer

    out = []
    for cfg_dict, prep, dtype in runs:
        torch.set_default_dtype(getattr(torch, dtype))  # fp64: the oracle comparisons; fp32: the losses
        cfg = config_from_dict(cfg_dict)
        if prep is not None and rank == 0:
            shutil.copytree(Path(cfg.out_dir) / prep[1], cfg.run_dir)
            cut_back(cfg.run_dir, prep[2])
            (cfg.run_dir / "summary.json").unlink()
        dist.barrier()
        trainer = Trainer(cfg, ParallelLayout.build(cfg.parallel.ep), torch.device("cpu"))
        summary = trainer.train()
        out.append({"summary": summary, **global_state(trainer)})
    torch.set_default_dtype(torch.float32)
    return out
