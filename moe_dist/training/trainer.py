"""The training loop shared by both engines: data, steps, logging, evaluation, checkpoints."""

from __future__ import annotations

import json
import logging
import math
import random
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from moe_dist.checkpoint.files import (
    FORMAT,
    AsyncSave,
    CheckpointError,
    SaveError,
    UnsafeCheckpointError,
    atomic_write_text,
    files_to_read,
    layout_refusal,
    load_obj,
    save_checkpoint,
    verified_checkpoints,
)
from moe_dist.checkpoint.global_state import (
    join_model,
    join_optimizer,
    layer_placements,
    owned_expert_ids,
    split_model,
    split_optimizer,
)
from moe_dist.data.corpus import Corpus
from moe_dist.errors import ConfigError, NonFiniteError
from moe_dist.models.transformer import MoETransformer, active_params
from moe_dist.moe.layer import moe_layers, update_expert_biases
from moe_dist.moe.parallel import ParallelLayout
from moe_dist.moe.placement import Placement
from moe_dist.training.balance_controller import AuxController
from moe_dist.training.config import RunConfig, config_yaml, keep_global_batch
from moe_dist.training.metrics import MetricsLogger, NullLogger
from moe_dist.training.preflight import SHARED_CHECK, stored_global_batch
from moe_dist.training.rebalance_loop import RebalanceLoop
from profiling.runtime.straggler import StragglerProfiler

log = logging.getLogger("moe_dist.train")

RESUME_CHECK_RTOL = 1e-5
"""Relative difference allowed between the val loss stored in a checkpoint and the loaded model's."""


class ResumeCheckError(CheckpointError):
    """The model loaded from a checkpoint does not reproduce the val loss it had when it was saved."""


@dataclass
class CollapseMonitor:
    """Warn when an expert stays under half the mean load for ``patience`` consecutive steps."""

    patience: int
    rank: int = 0
    streak: dict[tuple[int, int], int] = field(default_factory=dict)
    warned: set[tuple[int, int]] = field(default_factory=set)

    def update(self, step: int, layer: int, counts: list[float]) -> int:
        mean = sum(counts) / len(counts)
        collapsed = 0
        for e, n in enumerate(counts):
            key = (layer, e)
            self.streak[key] = self.streak.get(key, 0) + 1 if n < 0.5 * mean else 0
            if self.streak[key] >= self.patience:
                collapsed += 1
                if key not in self.warned and self.rank == 0:
                    self.warned.add(key)
                    log.warning(
                        "step %d: expert %d of MoE layer %d has stayed under half the mean load for "
                        "%d steps; the balancing coefficient looks too low",
                        step,
                        e,
                        layer,
                        self.streak[key],
                    )
        return collapsed


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)  # fsync before and after the rename (moe_dist/checkpoint.py)


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits in fp32 for the loss; fp32 and fp64 as they are (why: an fp64 model, as the
    tests build one, keeps its loss in fp64)."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def load_stats(counts: torch.Tensor) -> dict[str, float]:
    n = counts.double()
    mean = n.mean()
    return {
        "maxvio": float(n.max() / mean - 1) if mean > 0 else 0.0,
        "cv": float(n.std(unbiased=False) / mean) if mean > 0 else 0.0,
    }


class Trainer:
    def __init__(self, cfg: RunConfig, layout: ParallelLayout, device: torch.device) -> None:
        self.cfg, self.layout, self.device = cfg, layout, device
        self.rank, self.world = layout.rank, layout.world
        self.run_dir = cfg.run_dir
        self.ckpt_root = self.run_dir / "checkpoints"
        # why nothing is written here: a launch may still be refused at resume, and a refused launch must
        # leave the run directory as it found it (config.yaml and the logs are written in train())
        # a no-op after the entry point's preflight; a Trainer built directly resolves train.global_batch here
        derived = keep_global_batch(cfg, self.world)
        if derived and self.rank == 0:
            log.warning("%s", derived)
        torch.manual_seed(cfg.train.seed)  # same on every rank: identical dense init, same expert draws
        random.seed(cfg.train.seed)
        self.corpus = Corpus.build(cfg.data, cfg.model.seq_len, self.rank, self.world, cfg.train.seed)
        self.metrics = MetricsLogger(self.run_dir) if self.rank == 0 else NullLogger()
        hf_model = None
        if cfg.model.kind == "hf":  # a transformers LM; its sparse blocks are swapped below
            from moe_dist.models.hf import build_hf_model, sparse_layer_ids

            hf_model = build_hf_model(cfg.model.hf_config, cfg.train.seed, cfg.model.seq_len)
            moe_ids = sparse_layer_ids(hf_model)
        else:
            moe_ids = [i for i in range(cfg.model.n_layers) if (i + 1) % cfg.model.moe_every == 0]
        self.profiler = StragglerProfiler(
            cfg, self.rank, self.world, layout.ep, device, self.run_dir, self.metrics, moe_ids
        )
        placement = self._placement()
        if hf_model is not None:
            self.model = self._hf_lm(hf_model, placement).to(device)
        else:
            self.model = MoETransformer(
                cfg.model, layout.ep_group, layout.balance_group, self.profiler.hook, placement
            ).to(device)
        if cfg.engine == "deepspeed":
            from moe_dist.training.deepspeed_engine import DeepSpeedEngine

            self.engine = DeepSpeedEngine(self.model, cfg, layout, device)
        else:
            from moe_dist.training.engine import TorchEngine

            self.engine = TorchEngine(self.model, cfg, layout, device)
        self.collapse = CollapseMonitor(cfg.train.collapse_patience, self.rank)
        self.rebalancer: RebalanceLoop | None = None
        if cfg.parallel.placement == "balanced":  # the DeepSpeed engine refused it above (config check)
            self.rebalancer = RebalanceLoop(moe_layers(self.model), layout, cfg.parallel.rebalance_every)
        self.controller = None
        if any(m.cfg.aux_loss_coef == "auto" for m in moe_layers(self.model)):
            self.controller = AuxController(cfg.auto_aux, moe_layers(self.model))
        self.step = 0
        self.skipped = 0
        self.saved_at = -1
        self.stop_flag = 0.0
        self._sigterm = False
        m = cfg.model
        if hf_model is not None:
            self.n_active = self.model.active_params()
            self.flops_per_token = self.model.flops_per_token(m.seq_len)
        else:
            self.n_active = active_params(self.model, cfg.model)
            # nanoGPT: 6 x active params per token (fwd+bwd) + attention 12 * layers * d_model * seq
            self.flops_per_token = 6 * self.n_active + 12 * m.n_layers * m.d_model * m.seq_len
        if self.rank == 0:
            log.info(
                "corpus %s; %d layers, %d MoE, %.2fM params on rank 0, %.2fM active per token; "
                "world %d = dp %d x ep %d; engine %s",
                self.corpus.description,
                hf_model.config.num_hidden_layers if hf_model is not None else cfg.model.n_layers,
                len(moe_layers(self.model)),
                sum(p.numel() for p in self.model.parameters()) / 1e6,
                self.n_active / 1e6,
                self.world,
                layout.dp,
                layout.ep,
                cfg.engine,
            )

    def _placement(self) -> Placement:
        """Every MoE layer's expert placement at start: contiguous, with ``parallel.redundant_experts``
        replicas per rank (placement=balanced starts there too; ``RebalanceLoop`` re-places it; a resume
        switches to the checkpoint's placements, ``_stored_placements``)."""
        p = self.cfg.parallel
        if self.cfg.model.kind == "hf":
            from moe_dist.models.hf_config import hf_num_experts

            n = hf_num_experts(self.cfg.model.hf_config)
        else:
            n = self.cfg.model.moe.num_experts
        return Placement.contiguous(n, self.layout.ep, p.redundant_experts)

    def _hf_lm(self, hf_model, placement: Placement | None = None):
        """model.kind=hf: the transformers LM with every sparse-MoE block made expert-parallel over the run's
        layout (global balancing, the straggler profiler's timing hook), behind the trainer's interface."""
        from moe_dist.models.hf import HFCausalLM, parallelize_hf_model

        parallelize_hf_model(hf_model, self.layout, self.profiler.hook, placement, **self.cfg.model.hf_moe)
        return HFCausalLM(hf_model)

    def _on_sigterm(self, signum, frame) -> None:
        self._sigterm = True  # acted on at the end of the step, when every rank agrees

    # --- collectives -------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean_over_ranks(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
            t /= self.world
        return t.tolist()

    # --- checkpoints -------------------------------------------------------------------------
    def _val_loss_now(self) -> float:
        """The val loss of the model as it is now (the last evaluation's, if it was at this step)."""
        cached = getattr(self, "_last_eval", None)
        if cached is not None and cached[0] == self.step:
            return cached[1]["val_loss"]
        return self.evaluate()["val_loss"]

    def _checkpoint_files(self) -> tuple[dict[str, Any], dict]:
        """This rank's files of a checkpoint of the current state (format 2), and the manifest's meta."""
        dense, experts = split_model(self.model)
        own: dict[str, Any] = {
            "step": self.step,
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            },
        }
        dense_file: dict[str, Any] = {
            "format": FORMAT,
            "model": dense,
            "step": self.step,
            "controller": self.controller.state_dict() if self.controller else None,
            "initial_val_loss": getattr(self, "initial_val_loss", None),
            "log_sizes": self.metrics.sizes(),  # rank 0's JSONL sizes: a resume cuts replayed rows
            # the resume self-check: the val loss of exactly this model on the fixed validation set
            "val_check": {"val_loss": self._val_loss_now(), "val_sequences": self.cfg.train.val_sequences},
            "placements": layer_placements(self.model),  # which expert each slot held (a resume rebuilds)
            # the rebalance window so far (collective): a resume rebalances on the same counts
            "rebalance": self.rebalancer.state_dict() if self.rebalancer is not None else None,
        }
        experts_file: dict[str, Any] = {"model": experts}
        if self.cfg.engine == "deepspeed":
            own["engine"] = self.engine.state_dict()  # ZeRO partitions: bound to this layout
        else:
            d_opt, e_opt, groups = split_optimizer(self.model, self.engine.optimizer)
            scheduler = self.engine.scheduler.state_dict()
            dense_file.update(optimizer=d_opt, param_groups=groups, scheduler=scheduler)
            experts_file["optimizer"] = e_opt
        files: dict[str, Any] = {f"rank{self.rank}.pt": own}
        if self.rank == 0:
            files["dense.pt"] = dense_file
        if self.layout.dp_rank == 0:  # one copy of each EP rank's experts
            files[f"experts_ep{self.layout.ep_rank}.pt"] = experts_file
        # why a covering range [lo, hi): exact for contiguous placements (a readable manifest, as before);
        # with replicas a file's ids may have gaps, and a reader then verifies a file more, never one less
        meta = {
            "format": FORMAT,
            "world": self.world,
            "ep": self.layout.ep,
            "engine": self.cfg.engine,
            "experts": {
                f"experts_ep{e}.pt": [ids[0], ids[-1] + 1] if ids else [0, 0]
                for e, ids in enumerate(owned_expert_ids(self.model))
            },
            "placements": layer_placements(self.model),
            "global_batch": self.cfg.train.global_batch,  # sequences per step: a resume keeps it
            "config_digest": self.cfg.digest(),
            "config": self.cfg.to_dict(),  # a resume names the keys that changed (moe_dist/resume.py)
        }
        return files, meta

    def save(self) -> None:
        """Checkpoint the current state. With ``train.async_save`` the files are written in the background
        and committed later (``_poll_async_save``); the loop stalls only for a host copy of the state."""
        t0 = time.perf_counter()
        self._finish_async_save()  # why: one checkpoint in flight at a time, committed in step order
        files, meta = self._checkpoint_files()
        self.saved_at = self.step
        protect = [self.resumed_from] if getattr(self, "resumed_from", None) else []
        args = (self.ckpt_root, self.step, files, self.rank, self._gather, meta, self.cfg.train.keep_last)
        try:
            if self.cfg.train.async_save:
                self._pending_save = AsyncSave(*args, protect=protect)
            else:
                path = save_checkpoint(*args, protect=protect)
                if self.rank == 0:
                    log.info("checkpoint %s", path)
        except SaveError as e:
            self._save_failed(e)
        stall = time.perf_counter() - t0
        record = {"checkpoint_stall_s": stall, "async_save": self.cfg.train.async_save}
        self.metrics.log(self.step, record, {"checkpoint/stall_s": stall})

    def _gather(self, obj: Any) -> list:
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def _finish_async_save(self) -> None:
        """Every rank: wait for the checkpoint in flight (if any) and commit it."""
        pending, self._pending_save = getattr(self, "_pending_save", None), None
        if pending is not None:
            try:
                path = pending.finish(self._gather)
            except SaveError as e:
                self._save_failed(e)
                return
            if self.rank == 0:
                log.info("checkpoint %s (written in the background)", path)

    def _save_failed(self, e: SaveError) -> None:
        """Every rank holds the same SaveError (gathered): ``train.save_failure=stop`` raises it (one line per
        rank, exit 2), ``warn`` logs it on every rank and training goes on from the previous checkpoint."""
        if self.cfg.train.save_failure == "stop":
            raise e
        log.warning("%s; going on (train.save_failure=warn)", e)

    def _poll_async_save(self) -> None:
        """At a step end: commit the checkpoint in flight once every rank's files are written."""
        pending = getattr(self, "_pending_save", None)
        if pending is None:
            return
        # why agree: the commit is collective, so every rank must see every rank done
        (done,) = self.mean_over_ranks([float(pending.done())])
        if done == 1.0:
            self._finish_async_save()

    def _read_on_every_rank(self, ckpt: Path, names: list[str]) -> dict[str, Any]:
        """This rank's files of ``ckpt``, by name. If any rank cannot read one (refused or unreadable),
        every rank raises that rank's error: the others would otherwise wait in the next collective until
        the timeout."""
        files, error = None, None
        try:
            allowed: list = []
            if self.cfg.engine == "deepspeed":
                from moe_dist.training.deepspeed_engine import checkpoint_globals

                allowed = checkpoint_globals()
            # only rank files hold engine state (DeepSpeed's types), so only they get the allowlist
            files = {n: load_obj(ckpt / n, allowed if n.startswith("rank") else ()) for n in names}
        except CheckpointError as e:
            error = (isinstance(e, UnsafeCheckpointError), str(e))
        errors = [error]
        if self.world > 1:
            errors = [None] * self.world
            dist.all_gather_object(errors, error)
        for err in errors:
            if err is not None:
                unsafe, message = err
                raise (UnsafeCheckpointError if unsafe else CheckpointError)(message)
        assert files is not None
        return files

    def _stored_placements(self, manifest: dict) -> list[Placement] | None:
        """The checkpoint's placement of every MoE layer (layer order), when a resume rebuilds with them:
        the torch engine, and every layer with the same experts, EP size and slots per rank as this launch.
        None otherwise (a reshard, another redundant_experts): the config's contiguous placement is kept and
        each slot reads its expert by id."""
        stored = manifest.get("placements")
        ids = {id(m) for m in moe_layers(self.model)}
        named = [(n, m) for n, m in self.model.named_modules() if id(m) in ids]
        if self.cfg.engine != "torch" or not stored or set(stored) != {n for n, _ in named}:
            return None
        out = [Placement.from_dict(stored[n]) for n, _ in named]
        if any(p.shape != m.placement.shape for p, (_, m) in zip(out, named, strict=True)):
            return None
        return out

    def _names_for(self, manifest: dict) -> list[str]:
        refusal = layout_refusal(manifest, self.world, self.layout.ep, self.cfg.engine)
        if refusal is not None:
            raise ConfigError(refusal)
        stored = self._stored_placements(manifest)
        if stored is not None:  # the slots this rank will hold once the stored placements are set
            needed = sorted({e for p in stored for e in p.slot_expert_RL[self.layout.ep_rank]})
        else:
            needed = sorted({e for m in moe_layers(self.model) for e in m.slot_experts})
        return files_to_read(
            manifest, self.rank, self.world, self.layout.ep, self.cfg.model.moe.num_experts, needed
        )

    def _load_format1(self, files: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint from before per-expert files, at the layout that wrote it."""
        own = files[f"rank{self.rank}.pt"]
        experts = files[f"experts_ep{self.layout.ep_rank}.pt"]
        self.model.load_state_dict({**files["dense.pt"], **experts})
        self.engine.load_state_dict(own["engine"])
        return own

    def _load_global(self, files: dict[str, Any], manifest: dict) -> dict[str, Any]:
        """A format-2 checkpoint at any layout: this rank's experts are picked out by expert id. A load
        error on any rank is raised on every rank, the same line (why: the others would otherwise wait in
        the next collective until the timeout)."""
        state, error = None, None
        try:
            state = self._load_global_here(files, manifest)
        except CheckpointError as e:
            error = str(e)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            step = manifest.get("step")
            error = f"checkpoint of step {step} does not fit this model: {type(e).__name__}: {e}"
        failed = [(r, err) for r, err in enumerate(self._gather(error)) if err is not None]
        if failed:
            r, err = failed[0]
            raise CheckpointError(f"rank {r} could not load the checkpoint: {err}")
        assert state is not None
        return state

    def _load_global_here(self, files: dict[str, Any], manifest: dict) -> dict[str, Any]:
        """``_load_global`` on this rank alone."""
        dense = files["dense.pt"]
        experts: dict[str, Any] = {}
        experts_opt: dict[str, Any] = {}
        for name in manifest["experts"]:
            if name in files:
                experts.update(files[name]["model"])
                experts_opt.update(files[name].get("optimizer", {}))
        saved = dense.get("placements")
        stored = self._stored_placements(manifest)
        if stored is not None:
            # why set before loading: the slots then read the experts they held when saved, so a resume
            # after a rebalance continues bit-exactly (the stored version carries on too)
            for m, p in zip(moe_layers(self.model), stored, strict=True):
                m.set_placement(p)
        elif saved is not None and saved != layer_placements(self.model) and self.rank == 0:
            log.info(
                "the checkpoint's expert placements do not fit this launch (EP size or slots per rank "
                "changed): the config's contiguous placement; each slot reads its expert by id (weights and "
                "AdamW state), replicas included"
            )
        if self.rebalancer is not None:
            window = dense.get("rebalance")
            restored = stored is not None and window is not None and self.rebalancer.load_state_dict(window)
            if not restored:
                self.rebalancer.reset(int(dense["step"]))
                if self.rank == 0:
                    log.info("the rebalance window restarts at the resumed step %d", dense["step"])
        try:
            self.model.load_state_dict(join_model(self.model, dense["model"], experts))
            own = files[f"rank{self.rank % int(manifest['world'])}.pt"]
            if self.cfg.engine == "deepspeed":
                self.engine.load_state_dict(own["engine"])
            else:
                opt = join_optimizer(
                    self.model, self.engine.optimizer, dense["optimizer"], experts_opt, dense["param_groups"]
                )
                self.engine.optimizer.load_state_dict(opt)
                self.engine.scheduler.load_state_dict(dense["scheduler"])
        except (KeyError, ValueError, RuntimeError) as e:
            step = manifest.get("step")
            raise CheckpointError(f"checkpoint of step {step} does not fit this model: {e}") from None
        return {**dense, "rng": own["rng"]}

    def maybe_resume(self) -> None:
        self.resumed_from: str | None = None  # never deleted by this launch's rotation
        if not self.cfg.train.resume:
            return
        good, errors = verified_checkpoints(self.ckpt_root, self._names_for)
        shared = [(set(good), errors)]
        if self.world > 1:
            shared = [None] * self.world
            # why gather the errors too: every rank must name the same bad file, not just its own
            dist.all_gather_object(shared, (set(good), errors))
        common = set.intersection(*(steps for steps, _ in shared))
        bad: dict[int, str] = {}
        for _, errs in shared:
            for step, msg in errs.items():
                bad.setdefault(step, msg)
        if not common:
            if bad:
                newest = max(bad)
                raise CheckpointError(
                    f"{bad[newest]}; no checkpoint under {self.ckpt_root} verifies on every rank. Restore "
                    f"the file, or start a new run: another name=..., or train.resume=false "
                    f"train.overwrite=true (moves this run aside, deletes nothing)"
                )
            # a run that never reached a checkpoint starts again from step 0: its rows are replayed
            self.metrics.resume_at(0, {})
            return
        skipped = sorted(s for s in bad if s > max(common))
        if skipped and self.rank == 0:
            log.warning(
                "%s; resuming from the older step %d instead", "; ".join(bad[s] for s in skipped), max(common)
            )
        ckpt, manifest = good[max(common)]
        self.resumed_from = ckpt.name
        stored = stored_global_batch(manifest)
        if stored is not None and stored != self.cfg.train.global_batch and self.rank == 0:
            # the entry point's preflight keeps it (or was told to change it); a Trainer built directly
            # is told here, so that the change is never silent
            log.warning(
                "%s was trained with a global batch of %d sequences per step; this run uses %d",
                ckpt,
                stored,
                self.cfg.train.global_batch,
            )
        files = self._read_on_every_rank(ckpt, self._names_for(manifest))
        if manifest.get("format", 1) < FORMAT:
            state = self._load_format1(files)
            if self.rebalancer is not None:  # format 1 stored no window
                self.rebalancer.reset(int(state["step"]))
        else:
            state = self._load_global(files, manifest)
        if self.controller is not None and state.get("controller"):
            self.controller.load_state_dict(state["controller"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)  # noisy gating draws on the device
        if state.get("initial_val_loss") is not None:
            self.initial_val_loss = state["initial_val_loss"]
        self.step = state["step"]
        self.saved_at = self.step
        self.metrics.resume_at(self.step, state.get("log_sizes"))
        if self.rank == 0:
            log.info(
                "resumed from %s at step %d (written with world=%s, ep=%s; now world=%d, ep=%d)",
                ckpt,
                self.step,
                manifest.get("world"),
                manifest.get("ep"),
                self.world,
                self.layout.ep,
            )
        self._resume_check(ckpt, manifest, state.get("val_check"))

    def _resume_check(self, ckpt: Path, manifest: dict, saved: dict | None) -> None:
        """Evaluate the loaded model on the fixed validation set and compare with the val loss stored at
        save time; a ``resume_check`` record in metrics.jsonl either way."""
        record: dict[str, Any] = {
            "resume_check": "skipped",
            "checkpoint": ckpt.name,
            "saved_layout": [manifest.get("world"), manifest.get("ep")],
            "layout": [self.world, self.layout.ep],
        }
        if saved is None:  # format 1 stored no val loss
            self.metrics.log(self.step, record, {})
            return
        now = self.evaluate(saved["val_sequences"])["val_loss"]
        if not math.isfinite(saved["val_loss"]):
            # nothing to compare with: the model was already broken when it was saved, not by the load
            record.update(resume_check="unchecked", saved_val_loss=saved["val_loss"], resumed_val_loss=now)
            self.metrics.log(self.step, record, {})
            msg = (
                f"resume self-check: the val loss stored in {ckpt} is {saved['val_loss']} (non-finite): the "
                "model was already broken when it was saved, so the load cannot be checked against it"
            )
            if self.cfg.train.resume_check == "error":
                raise ResumeCheckError(msg + " (train.resume_check=warn goes on regardless)")
            if self.rank == 0:
                log.warning("%s; going on (train.resume_check=warn)", msg)
            return
        rel = abs(now - saved["val_loss"]) / max(abs(saved["val_loss"]), 1e-12)
        ok = rel <= RESUME_CHECK_RTOL
        record.update(
            resume_check="pass" if ok else "fail",
            saved_val_loss=saved["val_loss"],
            resumed_val_loss=now,
            rel_diff=rel,
        )
        self.metrics.log(self.step, record, {})
        if ok:
            return
        msg = (
            f"resume self-check failed: the model loaded from {ckpt} (written with world="
            f"{manifest.get('world')}, ep={manifest.get('ep')}; loaded at world={self.world}, ep="
            f"{self.layout.ep}) has val loss {now:.7g} on the fixed validation set, but "
            f"{saved['val_loss']:.7g} when it was saved (relative difference {rel:.2e} > "
            f"{RESUME_CHECK_RTOL:g}): the checkpoint was not restored as written"
        )
        if self.cfg.train.resume_check == "error":
            raise ResumeCheckError(msg + " (train.resume_check=warn goes on regardless)")
        if self.rank == 0:
            log.warning("%s; going on (train.resume_check=warn)", msg)

    def _check_shared_run_dir(self) -> None:
        """Every rank must see the run directory rank 0 writes (checkpoints are assembled in one directory
        by all ranks): rank 0 writes a nonce file there, every rank reads it back, and if any rank cannot,
        every rank raises the same ConfigError. The file is removed again (and the directories, if this made
        them), so a launch refused later still leaves the run directory as it found it."""
        if self.world == 1:
            return
        token, created, error = secrets.token_hex(8), [], None
        if self.rank == 0:
            try:
                created = [d for d in (self.run_dir, *self.run_dir.parents) if not d.exists()]
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / f"{SHARED_CHECK}{token}").write_text(token)
            except OSError as e:
                error = f"rank 0 cannot write into {self.run_dir}: {type(e).__name__}: {e}"
        token, error = self._gather((token, error))[0]  # rank 0's nonce; the gather is the barrier
        path = self.run_dir / f"{SHARED_CHECK}{token}"
        try:
            seen = path.read_text() == token
        except OSError:
            seen = False
        seen_R = self._gather(seen)
        if self.rank == 0:
            path.unlink(missing_ok=True)
            for d in created:  # innermost first: what this made, if still empty
                if not any(d.iterdir()):
                    d.rmdir()
        if error is not None:
            raise ConfigError(error)
        missing = [r for r, ok in enumerate(seen_R) if not ok]
        if missing:
            raise ConfigError(
                f"rank(s) {missing} cannot read the file rank 0 wrote into the run directory {self.run_dir}: "
                "out_dir must be on a filesystem shared by all nodes (the same path on every node)"
            )

    # --- the loop ----------------------------------------------------------------------------
    def train(self) -> dict:
        with logging_redirect_tqdm():  # why: log lines go above rank 0's bar instead of onto it
            return self._train()

    def _train(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self._check_shared_run_dir()
        self.maybe_resume()
        if self.step >= t.steps and (self.run_dir / "summary.json").is_file():
            # the launch preflight normally stops here first; a finished run keeps its results
            self.metrics.close()
            return json.loads((self.run_dir / "summary.json").read_text())
        # the run is known to start: from here on the run directory may change
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(self.run_dir / "config.yaml", config_yaml(cfg))
        self.profiler.start()
        bar = tqdm(
            total=t.steps, initial=self.step, disable=self.rank != 0, dynamic_ncols=True, desc=cfg.name
        )
        tokens_per_step = t.micro_batch * cfg.model.seq_len * t.grad_accum * self.world
        if self.rank == 0:
            log.info(
                "global batch: %d sequences per step = micro_batch %d x grad_accum %d x world %d",
                t.global_batch,
                t.micro_batch,
                t.grad_accum,
                self.world,
            )
        history: list[dict] = []
        last_eval: dict = {}
        if self.step == 0:  # the untrained model's val loss: the baseline the run improves on
            first_eval = self.evaluate()
            self.metrics.log(0, first_eval)
            self.initial_val_loss = first_eval["val_loss"]
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        preempted = False
        while self.step < t.steps:
            record = self.train_step()
            self.step += 1
            bar.update(1)
            if not record.get("skipped"):
                history.append(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    tok_s=f"{tokens_per_step / record['step_time']:.0f}",
                    maxvio=f"{record['maxvio_mean']:.2f}",
                )
            if self.step % t.eval_every == 0 or self.step == t.steps:
                last_eval = self.evaluate()
                self.metrics.log(self.step, last_eval)
                if self.rank == 0:
                    bar.write(
                        f"step {self.step}: val loss {last_eval['val_loss']:.4f}, "
                        f"bpb {last_eval['val_bpb']:.4f}"
                    )
            if (t.ckpt_every and self.step % t.ckpt_every == 0) or self.step == t.steps:
                self.save()
            else:
                self._poll_async_save()
            if self.stop_flag > 0:  # SIGTERM on any rank: every rank saves and leaves together
                preempted = True
                break
        if preempted:
            if self.saved_at != self.step:
                self.save()
            self._finish_async_save()
            if self.rank == 0:
                log.warning("SIGTERM: saved a final checkpoint at step %d and stopped", self.step)
        self._finish_async_save()  # the run's last checkpoint is committed before it reports
        signal.signal(signal.SIGTERM, previous)
        bar.close()
        self.profiler.close()
        if self.rank == 0:  # the whole run, across resumes: the JSONL holds each step once
            history, last_eval = self._logged_history(last_eval)
        summary = self.summary(history, last_eval, tokens_per_step)
        summary.update(preempted=preempted, skipped_steps=self.skipped)
        if self.rank == 0:
            _atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        self.metrics.close()
        return summary

    def _logged_history(self, last_eval: dict) -> tuple[list[dict], dict]:
        path = self.run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        history = [r for r in rows if "loss" in r and not r.get("skipped")]
        evals = [r for r in rows if "val_loss" in r]
        return history, (evals[-1] if evals else last_eval)

    def train_step(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self.model.train()
        t0 = time.perf_counter()
        ce_sum, aux_sum = 0.0, 0.0
        term_sums: dict[str, float] = {}
        dropped = [0] * len(moe_layers(self.model))
        local_maxvio = [0.0] * len(dropped)  # per-batch MaxVio: this rank's micro-batch alone
        for micro in range(t.grad_accum):
            x, y = self.corpus.batch(
                "train", t.micro_batch, cfg.model.seq_len, t.seed, self.rank, self.step, micro
            )
            try:  # NaN/Inf router logits raise on every rank together (the flag rides a collective)
                out = self.engine.forward(x.to(self.device))
            except NonFiniteError as e:
                return self._skip_step(t0, str(e))
            logits = _upcast(out.logits_BSV)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(self.device).reshape(-1))
            # why all-reduce here: every rank must take the same skip/raise decision before backward
            (ce_global,) = self.mean_over_ranks([float(ce.detach())])
            if not math.isfinite(ce_global):
                return self._skip_step(t0, f"step {self.step}: the training loss is {ce_global}")
            self.engine.backward(ce + out.aux_loss)
            ce_sum += float(ce.detach())
            aux_sum += float(out.aux_loss.detach())
            for layer_out in out.moe:
                for k, v in layer_out.terms.items():
                    term_sums[k] = term_sums.get(k, 0.0) + float(v.detach())
            for i, layer_out in enumerate(out.moe):
                dropped[i] += int(layer_out.stats.dropped)
                local = layer_out.stats.tokens_per_expert_local
                local_maxvio[i] += load_stats(local)["maxvio"] / t.grad_accum
        grad_norm = self.engine.step()
        bad_norm = self.engine.grad_norm_known and not math.isfinite(grad_norm)
        if cfg.engine == "deepspeed":
            # why a flag all-reduce: DeepSpeed's norm comes from its own reductions; the torch engine's norm
            # is the same number on every rank already (TorchEngine.step), so it needs none
            bad_norm = self.mean_over_ranks([float(bad_norm)])[0] > 0
        if bad_norm:  # the torch engine updated nothing (weights, AdamW state, scheduler); nor do we below
            return self._skip_step(t0, f"step {self.step}: the gradient norm is {grad_norm}")
        lr = self.engine.lr
        counts = update_expert_biases(self.model)  # the step's global counts per layer
        alphas = self.controller.update(counts) if self.controller is not None else None
        placed: dict = {}
        if self.rebalancer is not None and self.rebalancer.due(self.step, last=t.steps - 1):
            placed = self.rebalancer.rebalance(self.step, self.engine.optimizer)
        loss, aux, self.stop_flag, *local_maxvio = self.mean_over_ranks(
            [ce_sum / t.grad_accum, aux_sum / t.grad_accum, float(self._sigterm), *local_maxvio]
        )
        step_time = time.perf_counter() - t0
        record: dict = {
            "loss": loss,
            "aux_loss": aux,
            "lr": lr,
            "grad_norm": grad_norm,
            "step_time": step_time,
            "tokens_per_s": t.micro_batch * cfg.model.seq_len * t.grad_accum * self.world / step_time,
        }
        for k, v in term_sums.items():
            record[f"aux/{k}"] = v / t.grad_accum
        for i, a in enumerate(alphas or []):
            record[f"aux/alpha/L{i}"] = a
        maxvios = []
        for i, c in enumerate(counts):
            st = load_stats(c)
            maxvios.append(st["maxvio"])
            record[f"load/L{i}/maxvio"] = st["maxvio"]
            record[f"load/L{i}/maxvio_local"] = local_maxvio[i]
            record[f"load/L{i}/cv"] = st["cv"]
            record[f"load/L{i}/dropped"] = dropped[i]
            record[f"load/L{i}/collapsed"] = self.collapse.update(self.step, i, c.tolist())
        record["maxvio_mean"] = sum(maxvios) / max(1, len(maxvios))
        record["tflops"] = record["tokens_per_s"] * self.flops_per_token / 1e12
        if t.peak_tflops > 0:
            record["mfu"] = record["tflops"] / (t.peak_tflops * self.world)
        scalars = {k: v for k, v in record.items() if isinstance(v, int | float)}
        record["tokens_per_expert"] = [c.long().tolist() for c in counts]
        self.metrics.log(self.step, record, scalars)
        routing = {"tokens_per_expert": record["tokens_per_expert"]}
        if placed:  # the window's mean per-sender counts, for profiling.analysis.whatif_placement
            routing.update(
                tokens_per_expert_RN=placed["tokens_per_expert_RN"],
                rebalance_window_steps=placed["rebalance_window_steps"],
            )
        self.metrics.log(self.step, routing, {}, jsonl="routing.jsonl")
        extra = {"dropped": dropped, **self._padding(counts)}
        replicated = any(m.placement.is_replicated() for m in moe_layers(self.model))
        if replicated or self.rebalancer is not None:
            extra["replica_sync_ms"] = getattr(self.engine, "replica_sync_s", 0.0) * 1e3
            extra["placement_version"] = max(m.placement.version for m in moe_layers(self.model))
            extra["migration_ms"] = placed.get("migration_ms", 0.0)
            extra["migration_bytes"] = placed.get("migration_bytes", 0)
        self.profiler.step_end(self.step, step_time, extra)
        return record

    def _skip_step(self, t0: float, why: str) -> dict:
        """train.on_nonfinite: raise (default) or drop this step's gradients and move on."""
        if self.cfg.train.on_nonfinite == "raise":
            raise NonFiniteError(why)
        if self.cfg.engine == "deepspeed":
            # why: DeepSpeed steps its optimizer inside backward, before any check of ours could skip it
            raise NonFiniteError(
                f"{why} (engine=deepspeed cannot skip a step: train.on_nonfinite=skip is "
                "honoured by engine=torch only)"
            )
        log.warning("%s; skipping the step (train.on_nonfinite=skip)", why)
        self.model.zero_grad(set_to_none=True)
        for layer in moe_layers(self.model):
            layer.window_counts.zero_()
            layer.window_tokens.zero_()
        self.skipped += 1
        (self.stop_flag,) = self.mean_over_ranks([float(self._sigterm)])
        record = {"skipped": True, "reason": why, "step_time": time.perf_counter() - t0}
        self.metrics.log(self.step, record, {"skipped": 1.0})
        return record

    def _padding(self, counts: list[torch.Tensor]) -> dict:
        """Capacity mode: the rows a fixed-capacity (padded) buffer would carry beyond the kept tokens."""
        moe = self.cfg.model.moe
        if moe.capacity_factor is None:
            return {}
        t = self.cfg.train
        T_local = t.micro_batch * self.cfg.model.seq_len
        cap = math.ceil(moe.capacity_factor * moe.top_k * T_local / moe.num_experts)
        slots = cap * moe.num_experts * self.world * t.grad_accum  # every source rank's buffer, per step
        return {
            "capacity_padding": [
                slots - float(c.clamp(max=cap * self.world * t.grad_accum).sum()) for c in counts
            ]
        }

    @torch.no_grad()
    def evaluate(self, n: int | None = None) -> dict:
        """Mean next-byte loss over the fixed validation set (``train.val_sequences`` sequences, or the
        first ``n``; the same tokens at any world size): rank r takes the r-th contiguous share, in
        batches of micro_batch."""
        cfg, t = self.cfg, self.cfg.train
        S = cfg.model.seq_len
        self.model.eval()
        self.profiler.pause(True)
        n = t.val_sequences if n is None else n
        lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        rounds = math.ceil(math.ceil(n / self.world) / t.micro_batch)
        total, count = 0.0, 0
        for b in range(rounds):
            idx = list(range(lo + b * t.micro_batch, min(hi, lo + (b + 1) * t.micro_batch)))
            real = len(idx)
            # why a stand-in batch: every rank must run as many forwards as the others (the MoE layers'
            # collectives); its loss is not counted
            x, y = self.corpus.sequences("val", S, t.seed, 0, idx or [lo])
            try:
                out = self.engine.forward(x.to(self.device))
            except NonFiniteError as e:
                if t.on_nonfinite == "raise":
                    raise
                log.warning("evaluation: %s", e)
                total = float("nan")
                break
            logits = _upcast(out.logits_BSV)
            ce = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.to(self.device).reshape(-1), reduction="none"
            )
            total += float(ce.view(-1, S)[:real].sum(dtype=torch.float64))
            count += real * S
        sums = torch.tensor([total, count], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(sums)
        val = float(sums[0] / sums[1])
        self.model.train()
        self.profiler.pause(False)
        result = {"val_loss": val, "val_bpb": val / math.log(2)}
        if n == t.val_sequences:
            self._last_eval = (self.step, result)  # a save at this step reuses it for its self-check
        return result

    def summary(self, history: list[dict], last_eval: dict, tokens_per_step: int) -> dict:
        n_layers = len(moe_layers(self.model))
        timed = history[1:] or history  # the first step includes one-off warm-up costs
        mean_time = sum(r["step_time"] for r in timed) / max(1, len(timed))
        return {
            "steps": self.step,
            "final_train_loss": history[-1]["loss"] if history else None,
            "initial_val_loss": getattr(self, "initial_val_loss", None),
            "final_val_loss": last_eval.get("val_loss"),
            "final_val_bpb": last_eval.get("val_bpb"),
            "tokens_per_s": tokens_per_step / mean_time if history else None,
            "mean_maxvio_per_layer": [
                sum(r[f"load/L{i}/maxvio"] for r in history) / max(1, len(history)) for i in range(n_layers)
            ],
            "active_params": self.n_active,
            "tflops": tokens_per_step / mean_time * self.flops_per_token / 1e12 if history else None,
            "mfu": (
                tokens_per_step
                / mean_time
                * self.flops_per_token
                / 1e12
                / (self.cfg.train.peak_tflops * self.world)
                if history and self.cfg.train.peak_tflops > 0
                else None
            ),
            "collapse_warnings": len(self.collapse.warned),
            "world": self.world,
            "ep": self.layout.ep,
            "engine": self.cfg.engine,
        }
