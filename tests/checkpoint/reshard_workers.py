"""Rank-side bodies for the resharding tests: a training run that also reports what its model and
optimizer hold at the checkpoint under test."""

from __future__ import annotations

from typing import Any

import torch

from moe_dist.checkpoint.global_state import expert_slots
from moe_dist.moe.parallel import ParallelLayout
from moe_dist.training.config import config_from_dict

PROBE_BATCH = 4


def probe(trainer: Any) -> dict:
    """Logits on a fixed batch (the same on every rank) and each local expert's AdamW state by expert id."""
    model = trainer.model
    x = torch.randint(
        0, 256, (PROBE_BATCH, trainer.cfg.model.seq_len), generator=torch.Generator().manual_seed(7)
    )
    model.eval()
    with torch.no_grad():
        logits = trainer.engine.forward(x).logits_BSV.float()
    model.train()
    params = dict(model.named_parameters())
    moments = {}
    for name, slot in expert_slots(model).items():
        st = trainer.engine.optimizer.state[params[name]]
        for e, key in enumerate(slot.keys()):
            moments[key] = (st["exp_avg"][e].clone(), st["exp_avg_sq"][e].clone(), float(st["step"]))
    return {"logits": logits, "moments": moments, "step": trainer.step}


def probed_run(
    rank: int, world: int, cfg_dict: dict, probe_at: str, step: int = 0, swap: bool = False
) -> dict:
    """Train as the entry point does; probe at the save of ``step`` (probe_at="save") or right after the
    resume (probe_at="resume"). ``swap``: exchange experts 0 and 1 of the first MoE layer while loading."""
    import moe_dist.training.checkpointing as checkpointing_mod
    import moe_dist.training.trainer as trainer_mod

    if swap:
        join = checkpointing_mod.join_model

        def swapped(model, dense, experts):
            experts = dict(experts)
            for leaf in ("w1", "w2"):
                a, b = f"blocks.0.ffn.experts.e0.{leaf}", f"blocks.0.ffn.experts.e1.{leaf}"
                experts[a], experts[b] = experts[b], experts[a]
            return join(model, dense, experts)

        checkpointing_mod.join_model = swapped
    cfg = config_from_dict(cfg_dict)
    layout = ParallelLayout.build(cfg.parallel.ep)
    trainer = trainer_mod.Trainer(cfg, layout, torch.device("cpu"))
    out: dict = {}
    if probe_at == "save":
        save = trainer.save

        def save_and_probe() -> None:
            if trainer.step == step:
                out["probe"] = probe(trainer)
            save()

        trainer.save = save_and_probe
    else:
        resume = trainer.maybe_resume

        def resume_and_probe() -> None:
            resume()
            out["probe"] = probe(trainer)

        trainer.maybe_resume = resume_and_probe
    out["summary"] = trainer.train()
    return out


def preflighted_run(rank: int, world: int, cfg_dict: dict) -> dict:
    """As the entry point: the data check (which resolves model.vocab_size), the preflight (which keeps the
    stored global batch), then the trainer; returns the summary and the micro_batch and grad_accum the run
    trained with."""
    from moe_dist.training.data_check import check_data
    from moe_dist.training.preflight import preflight
    from moe_dist.training.trainer import Trainer

    cfg = config_from_dict(cfg_dict)
    check_data(cfg)
    preflight(cfg, world, rank)
    trainer = Trainer(cfg, ParallelLayout.build(cfg.parallel.ep), torch.device("cpu"))
    summary = trainer.train()
    t = cfg.train
    return {"summary": summary, "batch": (t.micro_batch, t.grad_accum, t.global_batch)}
