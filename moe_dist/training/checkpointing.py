"""The trainer's checkpoints: what goes into each file, save (synchronous or in the background), resume
at any layout, and the resume self-check. The format itself (names, writing, verifying) is
``moe_dist.checkpoint``; this manager decides what a training run stores and restores.

It lives in ``training`` rather than ``checkpoint`` because it works on the training run's objects (the
``RunConfig``, the engine behind its protocol, the rebalance window, the balance controller, the metrics
logger); ``checkpoint`` stays the format layer that ``moe_dist.export_hf`` and the preflight read without
a trainer.
"""

from __future__ import annotations

import json
import logging
import math
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

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
from moe_dist.checkpoint.global_state import join_model, layer_placements, owned_expert_ids, split_model
from moe_dist.checkpoint.model_files import has_checkpoint, store_model_files
from moe_dist.checkpoint.names import DENSE, experts_file, is_rank_file, rank_file
from moe_dist.errors import ConfigError
from moe_dist.moe.layer import moe_layers
from moe_dist.moe.parallel import ParallelLayout
from moe_dist.moe.placement import Placement
from moe_dist.training.balance_controller import AuxController
from moe_dist.training.config import RunConfig
from moe_dist.training.engine import Engine
from moe_dist.training.metrics import MetricsLogger, NullLogger
from moe_dist.training.preflight import SHARED_CHECK, data_identity, stored_global_batch
from moe_dist.training.rebalance_loop import RebalanceLoop

log = logging.getLogger("moe_dist.train")

RESUME_CHECK_RTOL = 1e-5
"""Relative difference allowed between the val loss stored in a checkpoint and the loaded model's."""


def will_resume(cfg: RunConfig) -> bool:
    """Whether this launch resumes a checkpoint, from the files, before the model is built (``resume`` then
    loads one or raises: with a checkpoint directory there, it never starts afresh)."""
    return cfg.train.resume and has_checkpoint(cfg.run_dir)


class ResumeCheckError(CheckpointError):
    """The model loaded from a checkpoint does not reproduce the val loss it had when it was saved."""


@dataclass
class Resumed:
    """What a resume hands back to the loop."""

    step: int
    """Steps completed when the checkpoint was taken."""
    initial_val_loss: float | None


class CheckpointManager:
    """Every rank holds one; every method is collective (all ranks call it together)."""

    def __init__(
        self,
        cfg: RunConfig,
        layout: ParallelLayout,
        device: torch.device,
        model: nn.Module,
        engine: Engine,
        metrics: MetricsLogger | NullLogger,
        rebalancer: RebalanceLoop | None,
        controller: AuxController | None,
        evaluate: Callable[[int | None], dict],
    ) -> None:
        self.cfg, self.layout, self.device = cfg, layout, device
        self.rank, self.world = layout.rank, layout.world
        self.model, self.engine, self.metrics = model, engine, metrics
        self.rebalancer, self.controller, self.evaluate = rebalancer, controller, evaluate
        self.root = cfg.run_dir / "checkpoints"
        self.resumed_from: str | None = None
        """The checkpoint this launch resumed from: never deleted by this launch's rotation."""
        self.saved_at = -1
        """Steps completed at the last save (-1: none yet)."""
        self.pending: AsyncSave | None = None
        """The background save in flight (``train.async_save``), committed by ``poll`` or ``finish``."""

    # --- collectives -------------------------------------------------------------------------
    def gather(self, obj: Any) -> list:
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def record_model(self, load: Any) -> None:
        """kind=hf, rank 0: the model directory's config and tokenizer files copied into the run directory
        (once, atomically: the export reads them there). model.hf_pretrained (``load``: the LoadStats): every
        rank's load row (bytes read, peak RSS) in ``hf_load.json``, by the launch that read the weights."""
        from moe_dist.models.hf_load import LOAD_RECORD

        if load is not None and not load.read and self.resumed_from is None:  # will_resume said otherwise
            raise CheckpointError(f"no checkpoint under {self.root} resumed; the weights were not read")
        rows = self.gather(load.to_json()) if load is not None and load.read else None
        if self.rank == 0 and self.cfg.model.kind == "hf" and isinstance(self.cfg.model.hf_config, str):
            store_model_files(Path(self.cfg.model.hf_config), self.cfg.run_dir)
        if self.rank == 0 and rows is not None:
            atomic_write_text(self.cfg.run_dir / LOAD_RECORD, json.dumps({"ranks": rows}, indent=1) + "\n")

    # --- save --------------------------------------------------------------------------------
    def files(
        self, step: int, val_loss: float, initial_val_loss: float | None
    ) -> tuple[dict[str, Any], dict]:
        """This rank's files of a checkpoint of the current state (format 2), and the manifest's meta."""
        dense, experts = split_model(self.model)
        own: dict[str, Any] = {
            "step": step,
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            },
        }
        dense_file: dict[str, Any] = {
            "format": FORMAT,
            "model": dense,
            "step": step,
            "controller": self.controller.state_dict() if self.controller else None,
            "initial_val_loss": initial_val_loss,
            "log_sizes": self.metrics.sizes(),  # rank 0's JSONL sizes: a resume cuts replayed rows
            # the resume self-check: the val loss of exactly this model on the fixed validation set
            "val_check": {"val_loss": val_loss, "val_sequences": self.cfg.train.val_sequences},
            "placements": layer_placements(self.model),  # which expert each slot held (a resume rebuilds)
            # the rebalance window so far (collective): a resume rebalances on the same counts
            "rebalance": self.rebalancer.state_dict() if self.rebalancer is not None else None,
        }
        experts_part: dict[str, Any] = {"model": experts}
        contrib = self.engine.checkpoint_state()
        own.update(contrib.own)
        dense_file.update(contrib.dense)
        experts_part.update(contrib.experts)
        files: dict[str, Any] = {rank_file(self.rank): own}
        if self.rank == 0:
            files[DENSE] = dense_file
        if self.layout.dp_rank == 0:  # one copy of each EP rank's experts
            files[experts_file(self.layout.ep_rank)] = experts_part
        # why a covering range [lo, hi): exact for contiguous placements (a readable manifest, as before);
        # with replicas a file's ids may have gaps, and a reader then verifies a file more, never one less
        meta = {
            "format": FORMAT,
            "world": self.world,
            "ep": self.layout.ep,
            "engine": self.cfg.engine,
            "experts": {
                experts_file(e): [ids[0], ids[-1] + 1] if ids else [0, 0]
                for e, ids in enumerate(owned_expert_ids(self.model))
            },
            "placements": layer_placements(self.model),
            "global_batch": self.cfg.train.global_batch,  # sequences per step: a resume keeps it
            "config_digest": self.cfg.digest(),
            "config": self.cfg.to_dict(),  # a resume names the keys that changed (training/preflight.py)
            "data": data_identity(self.cfg),  # its tokenizer's hash: a resume on another's data is refused
        }
        return files, meta

    def save(self, step: int, val_loss: float, initial_val_loss: float | None) -> None:
        """Checkpoint the state after ``step`` steps. With ``train.async_save`` the files are written in the
        background and committed later (``poll``); the caller stalls only for a host copy of the state."""
        self.finish()  # why: one checkpoint in flight at a time, committed in step order
        files, meta = self.files(step, val_loss, initial_val_loss)
        self.saved_at = step
        protect = [self.resumed_from] if self.resumed_from else []
        args = (self.root, step, files, self.rank, self.gather, meta, self.cfg.train.keep_last)
        try:
            if self.cfg.train.async_save:
                self.pending = AsyncSave(*args, protect=protect)
            else:
                path = save_checkpoint(*args, protect=protect)
                if self.rank == 0:
                    log.info("checkpoint %s", path)
        except SaveError as e:
            self._save_failed(e)

    def finish(self) -> None:
        """Wait for the checkpoint in flight (if any) and commit it."""
        pending, self.pending = self.pending, None
        if pending is not None:
            try:
                path = pending.finish(self.gather)
            except SaveError as e:
                self._save_failed(e)
                return
            if self.rank == 0:
                log.info("checkpoint %s (written in the background)", path)

    def poll(self) -> None:
        """At a step end: commit the checkpoint in flight once every rank's files are written."""
        if self.pending is None:
            return
        # why agree: the commit is collective, so every rank must see every rank done
        done = torch.tensor([float(self.pending.done())], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(done)
            done /= self.world
        if float(done) == 1.0:
            self.finish()

    def _save_failed(self, e: SaveError) -> None:
        """Every rank holds the same SaveError (gathered): ``train.save_failure=stop`` raises it (one line per
        rank, exit 2), ``warn`` logs it on every rank and training goes on from the previous checkpoint."""
        if self.cfg.train.save_failure == "stop":
            raise e
        log.warning("%s; going on (train.save_failure=warn)", e)

    # --- resume ------------------------------------------------------------------------------
    def resume(self) -> Resumed | None:
        """Load the newest checkpoint that verifies on every rank (None: no resume, or none to resume)."""
        if not self.cfg.train.resume:
            return None
        good, errors = verified_checkpoints(self.root, self._names_for)
        # why gather the errors too: every rank must name the same bad file, not just its own
        shared = self.gather((set(good), errors))
        common = set.intersection(*(steps for steps, _ in shared))
        bad: dict[int, str] = {}
        for _, errs in shared:
            for step, msg in errs.items():
                bad.setdefault(step, msg)
        if not common:
            if bad:
                newest = max(bad)
                raise CheckpointError(
                    f"{bad[newest]}; no checkpoint under {self.root} verifies on every rank. Restore "
                    f"the file, or start a new run: another name=..., or train.resume=false "
                    f"train.overwrite=true (moves this run aside, deletes nothing)"
                )
            # a run that never reached a checkpoint starts again from step 0: its rows are replayed
            self.metrics.resume_at(0, {})
            return None
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
        step = int(state["step"])
        self.saved_at = step
        self.metrics.resume_at(step, state.get("log_sizes"))
        if self.rank == 0:
            log.info(
                "resumed from %s at step %d (written with world=%s, ep=%s; now world=%d, ep=%d)",
                ckpt,
                step,
                manifest.get("world"),
                manifest.get("ep"),
                self.world,
                self.layout.ep,
            )
        self._resume_check(ckpt, manifest, state.get("val_check"), step)
        return Resumed(step, state.get("initial_val_loss"))

    def _read_on_every_rank(self, ckpt: Path, names: list[str]) -> dict[str, Any]:
        """This rank's files of ``ckpt``, by name. If any rank cannot read one (refused or unreadable),
        every rank raises that rank's error: the others would otherwise wait in the next collective until
        the timeout."""
        files, error = None, None
        try:
            allowed = self.engine.checkpoint_globals()
            # only rank files hold engine state (e.g. DeepSpeed's types), so only they get the allowlist
            files = {n: load_obj(ckpt / n, allowed if is_rank_file(n) else ()) for n in names}
        except CheckpointError as e:
            error = (isinstance(e, UnsafeCheckpointError), str(e))
        for err in self.gather(error):
            if err is not None:
                unsafe, message = err
                raise (UnsafeCheckpointError if unsafe else CheckpointError)(message)
        assert files is not None
        return files

    def _stored_placements(self, manifest: dict) -> list[Placement] | None:
        """The checkpoint's placement of every MoE layer (layer order), when a resume rebuilds with them:
        an engine that reshards, and every layer with the same experts, EP size and slots per rank as this
        launch. None otherwise (a reshard, another redundant_experts): the config's contiguous placement is
        kept and each slot reads its expert by id."""
        stored = manifest.get("placements")
        ids = {id(m) for m in moe_layers(self.model)}
        named = [(n, m) for n, m in self.model.named_modules() if id(m) in ids]
        if not self.engine.reshards or not stored or set(stored) != {n for n, _ in named}:
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
        own = files[rank_file(self.rank)]
        experts = files[experts_file(self.layout.ep_rank)]
        self.model.load_state_dict({**files[DENSE], **experts})
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
        failed = [(r, err) for r, err in enumerate(self.gather(error)) if err is not None]
        if failed:
            r, err = failed[0]
            raise CheckpointError(f"rank {r} could not load the checkpoint: {err}")
        assert state is not None
        return state

    def _load_global_here(self, files: dict[str, Any], manifest: dict) -> dict[str, Any]:
        """``_load_global`` on this rank alone."""
        dense = files[DENSE]
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
            own = files[rank_file(self.rank % int(manifest["world"]))]
            self.engine.load_checkpoint_state(dense, experts_opt, own)
        except (KeyError, ValueError, RuntimeError) as e:
            step = manifest.get("step")
            raise CheckpointError(f"checkpoint of step {step} does not fit this model: {e}") from None
        return {**dense, "rng": own["rng"]}

    def _resume_check(self, ckpt: Path, manifest: dict, saved: dict | None, step: int) -> None:
        """Evaluate the loaded model on the fixed validation set and compare with the val loss stored at
        save time; a ``resume_check`` record in metrics.jsonl (at ``step``: steps completed) either way."""
        record: dict[str, Any] = {
            "resume_check": "skipped",
            "checkpoint": ckpt.name,
            "saved_layout": [manifest.get("world"), manifest.get("ep")],
            "layout": [self.world, self.layout.ep],
        }
        if saved is None:  # format 1 stored no val loss
            self.metrics.log(step, record, {})
            return
        now = self.evaluate(saved["val_sequences"])["val_loss"]
        if not math.isfinite(saved["val_loss"]):
            # nothing to compare with: the model was already broken when it was saved, not by the load
            record.update(resume_check="unchecked", saved_val_loss=saved["val_loss"], resumed_val_loss=now)
            self.metrics.log(step, record, {})
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
        self.metrics.log(step, record, {})
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

    def check_shared_run_dir(self) -> None:
        """Every rank must see the run directory rank 0 writes (checkpoints are assembled in one directory
        by all ranks): rank 0 writes a nonce file there, every rank reads it back, and if any rank cannot,
        every rank raises the same ConfigError. The file is removed again (and the directories, if this made
        them), so a launch refused later still leaves the run directory as it found it."""
        if self.world == 1:
            return
        run_dir = self.cfg.run_dir
        token, created, error = secrets.token_hex(8), [], None
        if self.rank == 0:
            try:
                created = [d for d in (run_dir, *run_dir.parents) if not d.exists()]
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / f"{SHARED_CHECK}{token}").write_text(token)
            except OSError as e:
                error = f"rank 0 cannot write into {run_dir}: {type(e).__name__}: {e}"
        token, error = self.gather((token, error))[0]  # rank 0's nonce; the gather is the barrier
        path = run_dir / f"{SHARED_CHECK}{token}"
        try:
            seen = path.read_text() == token
        except OSError:
            seen = False
        seen_R = self.gather(seen)
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
                f"rank(s) {missing} cannot read the file rank 0 wrote into the run directory {run_dir}: "
                "out_dir must be on a filesystem shared by all nodes (the same path on every node)"
            )
