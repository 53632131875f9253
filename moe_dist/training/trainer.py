"""The training loop shared by every engine: data, steps, logging, evaluation. It delegates the rest:
checkpoints to ``CheckpointManager`` (training/checkpointing.py), the optimizer and scheduler to the
engine (the ``Engine`` protocol, training/engine.py), the collapse warning and the summary to
training/monitors.py, and each step's record to the typed records of profiling/runtime/record.py.

Step convention: ``self.step`` counts the steps completed. A step's own record (metrics.jsonl,
straggler.jsonl, routing.jsonl, log lines about one step) carries its 0-based index, which is the number
of steps completed before it; evaluations and checkpoints are "after N steps" (see training/metrics.py).
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from moe_dist.checkpoint.files import atomic_write_text
from moe_dist.errors import NonFiniteError
from moe_dist.models.transformer import MoETransformer, active_params
from moe_dist.moe.layer import moe_layers, update_expert_biases
from moe_dist.moe.parallel import ParallelLayout
from moe_dist.moe.placement import Placement
from moe_dist.training.balance_controller import AuxController
from moe_dist.training.checkpointing import RESUME_CHECK_RTOL, CheckpointManager, ResumeCheckError
from moe_dist.training.config import RunConfig, config_yaml, keep_global_batch
from moe_dist.training.data_check import corpus_for
from moe_dist.training.engine import build_engine
from moe_dist.training.memory import count_saved, grad_bytes, measured_memory
from moe_dist.training.metrics import MetricsLogger, NullLogger
from moe_dist.training.monitors import CollapseMonitor, RunFacts, build_summary, load_stats, logged_history
from moe_dist.training.rebalance_loop import Rebalanced, RebalanceLoop
from profiling.runtime.record import (
    LayerLoad,
    PlacementRecord,
    RoutingRecord,
    SkippedStep,
    StepExtras,
    StepRecord,
    WireCount,
)
from profiling.runtime.straggler import StragglerProfiler

__all__ = [  # with the names tests and tools have imported from here
    "RESUME_CHECK_RTOL",
    "CollapseMonitor",
    "ResumeCheckError",
    "Trainer",
    "load_stats",
]

log = logging.getLogger("moe_dist.train")


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits in fp32 for the loss; fp32 and fp64 as they are (why: an fp64 model, as the
    tests build one, keeps its loss in fp64)."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


class Trainer:
    def __init__(self, cfg: RunConfig, layout: ParallelLayout, device: torch.device) -> None:
        self.cfg, self.layout, self.device = cfg, layout, device
        self.rank, self.world = layout.rank, layout.world
        self.run_dir = cfg.run_dir
        # why nothing is written here: a launch may still be refused at resume, and a refused launch must
        # leave the run directory as it found it (config.yaml and the logs are written in train())
        # a no-op after the entry point's preflight; a Trainer built directly resolves train.global_batch here
        derived = keep_global_batch(cfg, self.world)
        if derived and self.rank == 0:
            log.warning("%s", derived)
        torch.manual_seed(cfg.train.seed)  # same on every rank: identical dense init, same expert draws
        random.seed(cfg.train.seed)
        self.corpus = corpus_for(cfg, self.rank, self.world)  # data.kind's row; fills in model.vocab_size
        self.metrics: MetricsLogger | NullLogger = (
            MetricsLogger(self.run_dir) if self.rank == 0 else NullLogger()
        )
        hf_model = None
        self.hf_load = None
        """model.hf_pretrained: this rank's LoadStats."""
        if cfg.model.kind == "hf":  # a transformers LM; its sparse blocks are swapped below
            from moe_dist.models.hf import build_hf_model, sparse_layer_ids
            from moe_dist.models.hf_load import pretrained_skeleton

            if cfg.model.hf_pretrained is not None:  # on the meta device; _hf_lm reads this rank's part
                hf_model = pretrained_skeleton(cfg.model.hf_source, cfg.model.seq_len)
            else:
                hf_model = build_hf_model(cfg.model.hf_source, cfg.train.seed, cfg.model.seq_len)
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
        self.engine = build_engine(self.model, cfg, layout, device)  # ENGINES[cfg.engine]
        self.collapse = CollapseMonitor(cfg.train.collapse_patience, self.rank)
        self.rebalancer: RebalanceLoop | None = None
        if cfg.parallel.placement == "balanced":  # the DeepSpeed engine refused it above (config check)
            self.rebalancer = RebalanceLoop(moe_layers(self.model), layout, cfg.parallel.rebalance_every)
        self.controller: AuxController | None = None
        if any(m.cfg.aux_loss_coef == "auto" for m in moe_layers(self.model)):
            self.controller = AuxController(cfg.auto_aux, moe_layers(self.model))
        self.ckpt = CheckpointManager(
            cfg,
            layout,
            device,
            self.model,
            self.engine,
            self.metrics,
            self.rebalancer,
            self.controller,
            self.evaluate,
        )
        self.step = 0
        """Steps completed."""
        self.skipped = 0
        self.grad_bytes = 0
        """The most gradient bytes the parameters held before an optimizer step (summary.json)."""
        self.stop_flag = 0.0
        self._sigterm = False
        self.initial_val_loss: float | None = None
        """The untrained model's val loss (stored in checkpoints: a resumed run keeps its baseline)."""
        self._last_eval: tuple[int, dict] | None = None
        """(steps completed, result) of the last full evaluation: a save at that step reuses it."""
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
        switches to the checkpoint's placements, ``CheckpointManager._stored_placements``)."""
        p = self.cfg.parallel
        if self.cfg.model.kind == "hf":
            from moe_dist.models.hf_config import hf_num_experts

            n = hf_num_experts(self.cfg.model.hf_source)
        else:
            n = self.cfg.model.moe.num_experts
        return Placement.contiguous(n, self.layout.ep, p.redundant_experts)

    def _hf_lm(self, hf_model, placement: Placement | None = None):
        """model.kind=hf: the transformers LM with every sparse-MoE block made expert-parallel over the run's
        layout (global balancing, the straggler profiler's timing hook), behind the trainer's interface."""
        from moe_dist.models.hf import HFCausalLM, parallelize_hf_model
        from moe_dist.models.hf_load import load_pretrained
        from moe_dist.training.checkpointing import will_resume

        m = self.cfg.model
        if m.hf_pretrained is not None:  # why not read on a resume: the checkpoint overwrites every weight
            args = (self.layout, placement, self.profiler.hook, self.device, not will_resume(self.cfg))
            self.hf_load = load_pretrained(hf_model, m.hf_pretrained, *args, **m.hf_moe)
        else:
            parallelize_hf_model(hf_model, self.layout, self.profiler.hook, placement, **m.hf_moe)
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

    # --- checkpoints (CheckpointManager) -----------------------------------------------------
    def _val_loss_now(self) -> float:
        """The val loss of the model as it is now (the last evaluation's, if it was at this step)."""
        if self._last_eval is not None and self._last_eval[0] == self.step:
            return self._last_eval[1]["val_loss"]
        return self.evaluate()["val_loss"]

    def save(self) -> None:
        """Checkpoint the state after ``self.step`` steps (``train.async_save``: in the background); the
        stall is logged to metrics.jsonl."""
        t0 = time.perf_counter()
        self.ckpt.finish()  # why first: the evaluation below must not overlap a commit in flight
        self.ckpt.save(self.step, self._val_loss_now(), self.initial_val_loss)
        stall = time.perf_counter() - t0
        record = {"checkpoint_stall_s": stall, "async_save": self.cfg.train.async_save}
        self.metrics.log(self.step, record, {"checkpoint/stall_s": stall})

    def maybe_resume(self) -> None:
        """Resume from the newest checkpoint that verifies on every rank, if ``train.resume``."""
        resumed = self.ckpt.resume()
        if resumed is None:
            return
        if resumed.initial_val_loss is not None:
            self.initial_val_loss = resumed.initial_val_loss
        self.step = resumed.step

    # --- the loop ----------------------------------------------------------------------------
    def train(self) -> dict:
        with logging_redirect_tqdm():  # why: log lines go above rank 0's bar instead of onto it
            return self._train()

    def _train(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self.ckpt.check_shared_run_dir()
        self.maybe_resume()
        if self.step >= t.steps and (self.run_dir / "summary.json").is_file():
            # the launch preflight normally stops here first; a finished run keeps its results
            self.metrics.close()
            return json.loads((self.run_dir / "summary.json").read_text())
        # the run is known to start: from here on the run directory may change
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", config_yaml(cfg))
        self.ckpt.record_model(self.hf_load)  # kind=hf: the model directory's files, the load's record
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
        history: list[StepRecord] = []
        last_eval: dict = {}
        if self.step == 0:  # the untrained model's val loss: the baseline the run improves on
            first_eval = self.evaluate()
            self.metrics.log(0, first_eval)
            self.initial_val_loss = first_eval["val_loss"]
            if t.steps == 0:  # a conversion run (e.g. HF -> ours): the loaded model, saved as step 0
                self.save()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        preempted = False
        while self.step < t.steps:
            record = count_saved(self.model, self.train_step)  # summary.json's activations_peak
            self.step += 1
            bar.update(1)
            if isinstance(record, StepRecord):
                history.append(record)
                bar.set_postfix(
                    loss=f"{record.loss:.3f}",
                    tok_s=f"{tokens_per_step / record.step_time:.0f}",
                    maxvio=f"{record.maxvio_mean:.2f}",
                )
            if self.step % t.eval_every == 0 or self.step == t.steps:
                last_eval = self.evaluate()
                self.metrics.log(self.step, last_eval)  # step = steps completed (metrics.py's legend)
                if self.rank == 0:
                    bar.write(
                        f"after {self.step} steps: val loss {last_eval['val_loss']:.4f}, "
                        f"bpb {last_eval['val_bpb']:.4f}"
                    )
            if (t.ckpt_every and self.step % t.ckpt_every == 0) or self.step == t.steps:
                self.save()
            else:
                self.ckpt.poll()
            if self.stop_flag > 0:  # SIGTERM on any rank: every rank saves and leaves together
                preempted = True
                break
        if preempted:
            if self.ckpt.saved_at != self.step:
                self.save()
            self.ckpt.finish()
            if self.rank == 0:
                log.warning("SIGTERM: saved a final checkpoint after %d steps and stopped", self.step)
        self.ckpt.finish()  # the run's last checkpoint is committed before it reports
        signal.signal(signal.SIGTERM, previous)
        bar.close()
        self.profiler.close()
        if self.rank == 0:  # the whole run, across resumes: the JSONL holds each step once
            history, last_eval = logged_history(self.run_dir, last_eval)
        facts = RunFacts(
            steps=self.step,
            active_params=self.n_active,
            flops_per_token=self.flops_per_token,
            peak_tflops=t.peak_tflops,
            world=self.world,
            ep=self.layout.ep,
            engine=cfg.engine,
            initial_val_loss=self.initial_val_loss,
            collapse_warnings=len(self.collapse.warned),
        )
        summary = build_summary(history, last_eval, tokens_per_step, len(moe_layers(self.model)), facts)
        memory = measured_memory(self.model, self.engine.optimizer, self.grad_bytes, self.device)
        summary.update(preempted=preempted, skipped_steps=self.skipped, memory_per_rank=memory)
        if self.rank == 0:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        self.metrics.close()
        return summary

    def train_step(self) -> StepRecord | SkippedStep:
        """One optimizer step (the 0-based step ``self.step``); its record, as logged."""
        cfg, t = self.cfg, self.cfg.train
        self.model.train()
        t0 = time.perf_counter()
        ce_sum, aux_sum = 0.0, 0.0
        term_sums: dict[str, float] = {}
        dropped = [0] * len(moe_layers(self.model))
        local_maxvio = [0.0] * len(dropped)  # per-batch MaxVio: this rank's micro-batch alone
        wire = WireCount.zeros(len(dropped))  # the measured dispatch all-to-all (straggler.jsonl)
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
            wire.add(out.moe)
            for i, layer_out in enumerate(out.moe):
                dropped[i] += int(layer_out.stats.dropped)
                local = layer_out.stats.tokens_per_expert_local
                local_maxvio[i] += load_stats(local)["maxvio"] / t.grad_accum
        self.grad_bytes = max(self.grad_bytes, grad_bytes(self.model))
        grad_norm = self.engine.step()
        bad_norm = self.engine.grad_norm_known and not math.isfinite(grad_norm)
        if not self.engine.norm_is_global:
            # why a flag all-reduce: e.g. DeepSpeed's norm comes from its own reductions; the torch engine's
            # norm is the same number on every rank already (TorchEngine.step), so it needs none
            bad_norm = self.mean_over_ranks([float(bad_norm)])[0] > 0
        if bad_norm:  # the torch engine updated nothing (weights, AdamW state, scheduler); nor do we below
            return self._skip_step(t0, f"step {self.step}: the gradient norm is {grad_norm}")
        lr = self.engine.lr
        counts = update_expert_biases(self.model)  # the step's global counts per layer
        alphas = self.controller.update(counts) if self.controller is not None else None
        placed: Rebalanced | None = None
        if self.rebalancer is not None and self.rebalancer.due(self.step, last=t.steps - 1):
            placed = self.rebalancer.rebalance(self.step, self.engine.optimizer)
        loss, aux, self.stop_flag, *local_maxvio = self.mean_over_ranks(
            [ce_sum / t.grad_accum, aux_sum / t.grad_accum, float(self._sigterm), *local_maxvio]
        )
        step_time = time.perf_counter() - t0
        tokens_per_s = t.micro_batch * cfg.model.seq_len * t.grad_accum * self.world / step_time
        layers = []
        for i, c in enumerate(counts):
            st = load_stats(c)
            collapsed = self.collapse.update(self.step, i, c.tolist())
            layers.append(LayerLoad(st["maxvio"], local_maxvio[i], st["cv"], dropped[i], collapsed))
        tflops = tokens_per_s * self.flops_per_token / 1e12
        record = StepRecord(
            loss=loss,
            aux_loss=aux,
            lr=lr,
            grad_norm=grad_norm,
            step_time=step_time,
            tokens_per_s=tokens_per_s,
            layers=layers,
            maxvio_mean=sum(ld.maxvio for ld in layers) / max(1, len(layers)),
            tflops=tflops,
            tokens_per_expert=[c.long().tolist() for c in counts],
            aux_terms={k: v / t.grad_accum for k, v in term_sums.items()},
            alphas=list(alphas or []),
            mfu=tflops / (t.peak_tflops * self.world) if t.peak_tflops > 0 else None,
        )
        self.metrics.log(self.step, record.to_jsonl(), record.scalars())
        routing = RoutingRecord(record.tokens_per_expert)
        if placed is not None:  # the window's mean per-sender counts, for profiling.analysis.whatif_placement
            routing.tokens_per_expert_RN = placed.tokens_per_expert_RN
            routing.rebalance_window_steps = placed.window_steps
        self.metrics.log(self.step, routing.to_jsonl(), {}, jsonl="routing.jsonl")
        extras = StepExtras(dropped, self._padding(counts), wire=wire)
        replicated = any(m.placement.is_replicated() for m in moe_layers(self.model))
        if replicated or self.rebalancer is not None:
            extras.placement = PlacementRecord(
                replica_sync_ms=self.engine.replica_sync_s * 1e3,
                placement_version=max(m.placement.version for m in moe_layers(self.model)),
                migration_ms=placed.migration_ms if placed is not None else 0.0,
                migration_bytes=placed.migration_bytes if placed is not None else 0,
            )
        self.profiler.step_end(self.step, step_time, extras)
        return record

    def _skip_step(self, t0: float, why: str) -> SkippedStep:
        """train.on_nonfinite: raise (default) or drop this step's gradients and move on."""
        if self.cfg.train.on_nonfinite == "raise":
            raise NonFiniteError(why)
        if not self.engine.can_skip_step:
            # why: e.g. DeepSpeed steps its optimizer inside backward, before any check of ours could skip it
            raise NonFiniteError(
                f"{why} (engine={self.cfg.engine} cannot skip a step: train.on_nonfinite=skip is "
                "honoured by engine=torch only)"
            )
        log.warning("%s; skipping the step (train.on_nonfinite=skip)", why)
        self.model.zero_grad(set_to_none=True)
        for layer in moe_layers(self.model):
            layer.window_counts.zero_()
            layer.window_tokens.zero_()
        self.skipped += 1
        (self.stop_flag,) = self.mean_over_ranks([float(self._sigterm)])
        record = SkippedStep(why, time.perf_counter() - t0)
        self.metrics.log(self.step, record.to_jsonl(), record.scalars())
        return record

    def _padding(self, counts: list[torch.Tensor]) -> list[float] | None:
        """Capacity mode: the rows a fixed-capacity (padded) buffer would carry beyond the kept tokens."""
        moe = self.cfg.model.moe
        if moe.capacity_factor is None:
            return None
        t = self.cfg.train
        T_local = t.micro_batch * self.cfg.model.seq_len
        cap = math.ceil(moe.capacity_factor * moe.top_k * T_local / moe.num_experts)
        slots = cap * moe.num_experts * self.world * t.grad_accum  # every source rank's buffer, per step
        return [slots - float(c.clamp(max=cap * self.world * t.grad_accum).sum()) for c in counts]

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
        result = {"val_loss": val, "val_bpb": val * self.corpus.tokens_per_byte / math.log(2)}
        if n == t.val_sequences:
            self._last_eval = (self.step, result)  # a save after these steps reuses it for its self-check
        return result
