"""Rank-side bodies for the training-system tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_dist.data.corpus import Corpus
from moe_dist.models.transformer import MoETransformer
from moe_dist.moe.parallel import ParallelLayout
from moe_dist.training.config import config_from_dict
from moe_dist.training.engine import TorchEngine


def tiny(**sections) -> dict:
    """A small, fast run config as a dict (sections merged one level deep)."""
    base = {
        "name": "tiny",
        "model": {
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 2,
            "seq_len": 16,
            "d_ff_dense": 64,
            "moe": {"num_experts": 4, "top_k": 2, "d_ff": 32, "z_loss_coef": 1e-3},
        },
        "parallel": {"ep": 1, "backend": "gloo", "timeout_s": 60},
        "data": {"kind": "synthetic", "max_bytes": 200_000},
        "train": {"steps": 4, "micro_batch": 4, "eval_every": 2, "val_sequences": 16, "log_every": 1},
        "optim": {"warmup_steps": 2},
        "profile": {},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged = dict(base[key])
            for k, v in value.items():
                merged[k] = (
                    {**merged[k], **v} if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
                )
            base[key] = merged
        else:
            base[key] = value
    return base


def grad_sync_worker(rank: int, world: int, cfg_dict: dict) -> dict:
    """One step's synced grads (fp64) from the torch engine, plus this rank's batches."""
    cfg = config_from_dict(cfg_dict)
    layout = ParallelLayout.build(cfg.parallel.ep)
    torch.manual_seed(cfg.train.seed)
    model = MoETransformer(cfg.model, layout.ep_group, layout.balance_group).double()
    engine = TorchEngine(model, cfg, layout, torch.device("cpu"))
    corpus = Corpus.build(cfg.data, cfg.model.seq_len, rank, world, cfg.train.seed)
    batches = []
    for micro in range(cfg.train.grad_accum):
        x, y = corpus.batch("train", cfg.train.micro_batch, cfg.model.seq_len, cfg.train.seed, rank, 0, micro)
        out = model(x)
        engine.backward(F.cross_entropy(out.logits_BSV.reshape(-1, 256), y.reshape(-1)) + out.aux_loss)
        batches.append((x, y))
    engine.sync_grads()
    return {
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "batches": batches,
        "ep_rank": layout.ep_rank,
        "norm": engine._global_norm(),
    }


def train_worker(rank: int, world: int, cfg_dict: dict) -> dict:
    """A whole training run in-process (the trainer as the entry point builds it)."""
    from moe_dist.training.trainer import Trainer

    cfg = config_from_dict(cfg_dict)
    layout = ParallelLayout.build(cfg.parallel.ep)
    return Trainer(cfg, layout, torch.device("cpu")).train()


def _expert_state(trainer) -> list[dict]:
    """Per MoE layer: the placement, this rank's slot table, and every stacked expert tensor with its AdamW
    exp_avg / exp_avg_sq (cloned)."""
    from moe_dist.moe.layer import moe_layers

    opt = trainer.engine.optimizer
    out = []
    for m in moe_layers(trainer.model):
        tensors = {}
        for name, p in m.experts.named_parameters():
            tensors[name] = p.detach().clone()
            for k in ("exp_avg", "exp_avg_sq"):
                tensors[f"{name}.{k}"] = opt.state[p][k].clone()
        out.append({"placement": m.placement.to_dict(), "slot_experts": list(m.slot_experts), "t": tensors})
    return out


def fp64_runs_worker(rank: int, world: int, runs: list[tuple[dict, tuple | None]]) -> list[dict]:
    """Several fp64 training runs in turn, in one launch (each launch costs every rank a start-up). A run's
    second item, ("resume", src, step), first makes its run directory a copy of run ``src`` cut back to the
    checkpoint of ``step`` (rank 0, then a barrier). Returns per run the summary and ``_expert_state``."""
    import shutil
    from pathlib import Path

    import torch.distributed as dist

    from moe_dist.training.trainer import Trainer

    torch.set_default_dtype(torch.float64)  # why: placements change summation orders; fp64 keeps it ~1e-15
    results = []
    for cfg_dict, prep in runs:
        cfg = config_from_dict(cfg_dict)
        if prep is not None and rank == 0:
            _, src, step = prep
            src_dir = Path(cfg.out_dir) / src
            shutil.copytree(src_dir, cfg.run_dir)
            for ckpt in (cfg.run_dir / "checkpoints").glob("step_*"):
                if int(ckpt.name.split("_")[1]) > step:
                    shutil.rmtree(ckpt)
            (cfg.run_dir / "summary.json").unlink()
        dist.barrier()
        layout = ParallelLayout.build(cfg.parallel.ep)
        trainer = Trainer(cfg, layout, torch.device("cpu"))
        summary = trainer.train()
        results.append({"summary": summary, "ep_rank": layout.ep_rank, "layers": _expert_state(trainer)})
    return results


def train_each_worker(rank: int, world: int, cfg_dicts: list[dict]) -> list[dict]:
    """``train_worker`` on each config in turn, in the same ranks (one spawn instead of one per run)."""
    return [train_worker(rank, world, cfg_dict) for cfg_dict in cfg_dicts]
