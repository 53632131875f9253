"""The run's config: nested dataclasses loaded from YAML with dotted CLI overrides.

    cfg = load_config("configs/cpu_demo.yaml", ["model.moe.top_k=1", "train.steps=50"])

Unknown keys fail with the nearest valid name; every section validates itself in ``__post_init__``, so a
bad config is rejected before any process group exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moe_dist.checkpoint.model_files import has_checkpoint, read_stored_model_files
from moe_dist.data.config import DataConfig
from moe_dist.errors import ConfigError
from moe_dist.models.config import ModelConfig
from moe_dist.moe.config import check_positive, check_type
from moe_dist.moe.placement import DEEPSPEED_REFUSES_BALANCED, DEEPSPEED_REFUSES_REPLICAS, check_redundant
from moe_dist.training.fsdp_config import FSDPConfig, refuse_for_fsdp


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's floats: ``1e-3`` and ``3E+4`` are numbers, as a user writes them.

    why: PyYAML implements YAML 1.1, whose float pattern needs a dot and a signed exponent, so ``1e-3``
    (the README's own notation) would load as the string "1e-3".
    """


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML as the config reads it (files and ``key=value`` overrides alike)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class ParallelConfig:
    ep: int = 1
    """Expert-parallel size; the data-parallel size is world / ep."""
    backend: str = "auto"
    """"auto" (nccl with CUDA, else gloo), "gloo" or "nccl"."""
    timeout_s: float = 300.0
    """Collective timeout: a rank stuck in a collective fails after this long instead of hanging."""
    placement: str = "contiguous"
    """Which experts each EP rank holds (moe_dist/placement.py): "contiguous" (rank r holds experts
    [r*N/ep, (r+1)*N/ep), plus ``redundant_experts`` replicas of the next rank's) or "balanced" (starts
    contiguous, then re-placed from the measured loads every ``rebalance_every`` steps, weights and AdamW
    state moved exactly: moe_dist/rebalance_loop.py; engine=torch only)."""
    redundant_experts: int = 0
    """Extra expert slots per EP rank, each holding a replica of an expert the rank does not hold (0 = no
    replicas). Needs ep >= 2, at most N - N/ep, and engine=torch. Replicas share their expert's tokens; their
    grads are summed over the EP group every step."""
    rebalance_every: int = 0
    """placement=balanced: steps between re-placements (> 0); must stay 0 with placement=contiguous."""

    def __post_init__(self) -> None:
        check_type("parallel", "ep", self.ep, (int,))
        if self.ep < 1:
            raise ConfigError(f"parallel.ep must be >= 1, got {self.ep}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"parallel.backend must be auto, gloo or nccl, got {self.backend!r}")
        check_positive("parallel", self, "timeout_s")
        if self.placement not in ("contiguous", "balanced"):
            raise ConfigError(f"parallel.placement must be contiguous or balanced, got {self.placement!r}")
        for name in ("redundant_experts", "rebalance_every"):
            check_type("parallel", name, getattr(self, name), (int,))
            check_positive("parallel", self, name, allow_zero=True)
        if self.placement == "balanced" and self.rebalance_every <= 0:
            raise ConfigError("parallel.placement=balanced needs parallel.rebalance_every > 0 (steps)")
        if self.placement == "contiguous" and self.rebalance_every:
            raise ConfigError(
                f"parallel.rebalance_every={self.rebalance_every} needs parallel.placement=balanced "
                "(a contiguous placement is never re-placed)"
            )
        if self.redundant_experts and self.ep < 2:
            raise ConfigError(
                f"parallel.redundant_experts={self.redundant_experts} needs parallel.ep >= 2 (with one EP "
                "rank every expert is already local)"
            )


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    min_lr: float = 3e-4
    """Floor of the cosine decay."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on norms or the router bias)."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm (0 = off)."""

    def __post_init__(self) -> None:
        check_positive("optim", self, "lr")
        check_positive("optim", self, "min_lr", "warmup_steps", "weight_decay", "grad_clip", allow_zero=True)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            check_type("optim", name, value, (int, float))
            if not 0 <= value < 1:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {value}")


@dataclass
class TrainConfig:
    steps: int = 200
    """Optimizer steps. 0: a conversion run: load (``model.hf_pretrained``), evaluate, save step 0."""
    micro_batch: int = 8
    """Sequences per micro-batch per rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    global_batch: int = 0
    """Sequences per optimizer step over all ranks (micro_batch x grad_accum x world): a fact of the run, kept
    across a resume at another world or EP size. 0 = micro_batch x grad_accum x world at the first start;
    the checkpoint stores it, and a resume at another layout derives grad_accum (or micro_batch) from it, or
    refuses in one line (``keep_global_batch``). Set it to change the global batch on purpose."""
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    """Validation every k steps (and at the end)."""
    val_sequences: int = 128
    """The validation set: this many fixed sequences of the val split, the same tokens whatever the world
    size (each rank evaluates its share in batches of micro_batch)."""
    ckpt_every: int = 0
    """Checkpoint every k steps (0 = only at the end)."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    collapse_patience: int = 20
    """Warn when an expert stays under half the mean load for this many consecutive steps."""
    resume: bool = True
    """Resume from the run directory's latest checkpoint if one exists."""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device, for the MFU estimate (0 = unknown: only TFLOP/s is logged)."""
    retain_host_memory: bool = True
    """CPU runs: keep freed memory (the entry point re-executes itself under mimalloc) so large per-step
    tensors reuse their pages instead of page-faulting afresh every step (see moe_dist/hostmem.py)."""
    on_nonfinite: str = "raise"
    """NaN/Inf in router logits, the loss or the global grad norm: "raise" (an error naming step and layer)
    or "skip" the step (no update at all; engine=torch only, DeepSpeed always raises)."""
    resume_check: str = "error"
    """On resume, the val loss of the loaded model is compared with the one stored at save time (1e-5
    relative): "error" stops the run when they differ, "warn" logs and goes on."""
    async_save: bool = False
    """Write checkpoint files in a background thread; the checkpoint is committed (manifest, rename) once
    every rank's files are written, checked at each step end, the next save and the run's end."""
    save_failure: str = "stop"
    """A checkpoint that cannot be written on some rank (disk full, permissions, a non-finite tensor):
    "stop" ends the run (one line per rank naming the failing rank, exit 2), "warn" logs that line and
    trains on. Either way nothing of it is kept and the previous checkpoint stays the newest."""
    overwrite: bool = False
    """With ``resume: false``, start over in a run directory that already holds a run by moving the old
    run aside (to ``<name>.old-<time>`` beside it; nothing is deleted). Without it such a start is refused."""

    def __post_init__(self) -> None:
        check_type("train", "steps", self.steps, (int,))
        check_positive("train", self, "steps", allow_zero=True)  # 0: a conversion run (load, eval, save)
        for name in (
            "micro_batch",
            "grad_accum",
            "log_every",
            "eval_every",
            "val_sequences",
            "keep_last",
            "collapse_patience",
        ):
            check_type("train", name, getattr(self, name), (int,))
            check_positive("train", self, name)
        check_type("train", "seed", self.seed, (int,))
        check_type("train", "global_batch", self.global_batch, (int,))
        check_positive("train", self, "global_batch", allow_zero=True)
        for name in ("resume", "bf16", "retain_host_memory", "async_save", "overwrite"):
            check_type("train", name, getattr(self, name), (bool,))
        if self.save_failure not in ("stop", "warn"):
            raise ConfigError(f"train.save_failure must be stop or warn, got {self.save_failure!r}")
        if self.overwrite and self.resume:
            raise ConfigError(
                "train.overwrite=true starts the run over (moving the old one aside): it needs "
                "train.resume=false; drop train.overwrite to resume instead"
            )
        if self.resume_check not in ("error", "warn"):
            raise ConfigError(f"train.resume_check must be error or warn, got {self.resume_check!r}")
        if self.on_nonfinite not in ("raise", "skip"):
            raise ConfigError(f"train.on_nonfinite must be raise or skip, got {self.on_nonfinite!r}")
        check_type("train", "ckpt_every", self.ckpt_every, (int,))
        check_positive("train", self, "peak_tflops", allow_zero=True)
        check_positive("train", self, "ckpt_every", allow_zero=True)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    """ZeRO stage 0, 1 or 2."""
    extra: dict = field(default_factory=dict)
    """Merged verbatim into the generated DeepSpeed JSON config."""

    def __post_init__(self) -> None:
        check_type("deepspeed", "zero_stage", self.zero_stage, (int,))
        check_type("deepspeed", "extra", self.extra, (dict,))
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"deepspeed.zero_stage must be 0, 1 or 2, got {self.zero_stage}")


@dataclass
class AutoAuxConfig:
    """The balance controller, active when model.moe.aux_loss_coef is "auto" (see README for the law)."""

    target_maxvio: float = 1.0
    """A layer is balanced when its smoothed MaxVio (max/mean - 1) is at most this ..."""
    target_min_load: float = 0.5
    """... and its least-loaded expert has at least this fraction of the mean load (smoothed)."""
    horizon: int = 10
    """Steps of the moving average of the relative loads the law reads (1 = this step's loads only)."""
    up: float = 1.05
    """alpha is multiplied by this after every unbalanced step."""
    down: float = 0.8
    """alpha is multiplied by this after ``window`` balanced steps in a row."""
    window: int = 20
    min_coef: float = 1e-5
    max_coef: float = 0.3

    def __post_init__(self) -> None:
        names = ("target_maxvio", "target_min_load", "min_coef", "max_coef", "up", "down")
        check_positive("auto_aux", self, *names)
        for name in ("window", "horizon"):
            check_type("auto_aux", name, getattr(self, name), (int,))
        check_positive("auto_aux", self, "window", "horizon")
        if self.up <= 1 or not 0 < self.down < 1 or self.min_coef > self.max_coef:
            raise ConfigError("auto_aux needs up > 1, 0 < down < 1 and min_coef <= max_coef")


@dataclass
class ProfileConfig:
    enabled: bool = True
    """Straggler timers (needs parallel.ep > 1): per layer, rank and step, expert time vs wait."""
    trace: bool = False
    """Also run torch.profiler with the schedule below; traces go to the run's tb/ directory."""
    wait: int = 5
    warmup: int = 2
    active: int = 3
    repeat: int = 1
    inject_delay_ms: float = 0.0
    """Validation knob: a known delay on inject_rank in MoE layer inject_layer (0 = off)."""
    inject_layer: int = 0
    inject_rank: int = 0
    inject_where: str = "experts"
    """"experts" (inside the expert stage) or "before_dispatch" (a control that must NOT count)."""

    def __post_init__(self) -> None:
        for name in ("enabled", "trace"):
            check_type("profile", name, getattr(self, name), (bool,))
        for name in ("wait", "warmup", "active", "repeat", "inject_layer", "inject_rank"):
            check_type("profile", name, getattr(self, name), (int,))
            check_positive("profile", self, name, allow_zero=name not in ("active",))
        check_positive("profile", self, "inject_delay_ms", allow_zero=True)
        if self.inject_where not in ("experts", "before_dispatch"):
            raise ConfigError(
                f"profile.inject_where must be experts or before_dispatch, got {self.inject_where!r}"
            )


@dataclass
class RunConfig:
    name: str = "run"
    """Run directory name under out_dir."""
    out_dir: str = "runs"
    engine: str = "torch"
    """"torch" (launch with torchrun), "fsdp" (torchrun; FSDP2 sharding beside EP) or "deepspeed" (launch
    with the deepspeed launcher)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    auto_aux: AutoAuxConfig = field(default_factory=AutoAuxConfig)

    def __post_init__(self) -> None:
        if self.engine not in ("torch", "deepspeed", "fsdp"):
            raise ConfigError(f"engine must be torch, deepspeed or fsdp, got {self.engine!r}")
        check_type("run", "name", self.name, (str,))
        check_type("run", "out_dir", self.out_dir, (str,))
        if self.name in ("", ".", "..") or any(c in self.name for c in "/\\\0"):
            # why: the run directory is out_dir/name; "..", "/x" or "a/b" would write outside out_dir
            raise ConfigError(
                "name must be a plain directory name (not empty, '.' or '..'; no '/' or '\\'), got "
                f"{self.name!r}"
            )
        read_stored_model_files(self.model, self.run_dir, self.train.resume)  # a gone model dir, on resume
        if self.engine == "deepspeed" and self.parallel.redundant_experts:
            raise ConfigError(DEEPSPEED_REFUSES_REPLICAS)
        if self.engine == "deepspeed" and self.parallel.placement == "balanced":
            raise ConfigError(DEEPSPEED_REFUSES_BALANCED)
        if self.engine == "fsdp":
            refuse_for_fsdp(self)
        n, ep = self.model.moe.num_experts, self.parallel.ep
        if self.model.kind == "moe_dist" and n % ep == 0:  # else check_world names the divisibility
            check_redundant(n, ep, self.parallel.redundant_experts)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def check_world(self, world: int) -> None:
        """Divisibility of world, EP size and experts; called before any process group work."""
        ep, n = self.parallel.ep, self.model.moe.num_experts
        if self.model.kind == "hf":
            from moe_dist.models.hf_config import hf_num_experts

            n = hf_num_experts(self.model.hf_source)
            resumes = self.train.resume and has_checkpoint(self.run_dir)  # reads no HF weight: needs no shard
            if self.model.hf_pretrained is not None and not resumes:  # every shard and key, from the headers
                from moe_dist.models.hf_load import check_pretrained

                check_pretrained(self.model.hf_pretrained, self.model.seq_len)
        if world % ep:
            raise ConfigError(f"parallel.ep={ep} does not divide the world size {world}")
        if n % ep:
            what = "the HF config's expert count" if self.model.kind == "hf" else "model.moe.num_experts"
            raise ConfigError(f"{what}={n} is not divisible by parallel.ep={ep}")
        check_redundant(n, ep, self.parallel.redundant_experts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Hash of the resolved config, compared across ranks at start."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# Keys that existed once: an old config gets told what replaced them, not just "unknown".
RENAMED = {
    "train.eval_batches": (
        "; it was replaced by train.val_sequences (a fixed validation set of that many sequences, the same "
        "whatever the world size): drop the key, or set train.val_sequences"
    ),
}


def keep_global_batch(cfg: RunConfig, world: int, stored: int | None = None, where: str = "") -> str | None:
    """Make ``micro_batch x grad_accum x world`` the run's global batch, in place; returns a line saying what
    was derived (None when nothing changed). The target is ``train.global_batch`` if set, else ``stored``
    (the checkpoint's), else the product itself (a first start). It keeps micro_batch and derives
    grad_accum where that divides (the per-rank memory stays), else keeps grad_accum and derives
    micro_batch, else takes grad_accum 1; raises ConfigError (one line) when ``world`` does not divide it.
    """
    t = cfg.train
    B, A = t.micro_batch, t.grad_accum
    now = B * A * world
    target = t.global_batch or stored or now
    if now == target:
        t.global_batch = target
        return None
    source = (
        "train.global_batch" if t.global_batch else f"the global batch stored in {where or 'the checkpoint'}"
    )
    if target % world:
        raise ConfigError(
            f"{source} is {target} sequences per step, which world size {world} cannot keep (it does not "
            f"divide it); this config gives micro_batch {B} x grad_accum {A} x world {world} = {now}: "
            f"relaunch on a world size that divides {target}, or set train.global_batch={now} to change it"
        )
    per_rank = target // world
    for micro, accum in ((B, per_rank // B), (per_rank // A, A), (per_rank, 1)):
        if micro >= 1 and accum >= 1 and micro * accum == per_rank:
            t.micro_batch, t.grad_accum, t.global_batch = micro, accum, target
            return (
                f"{source} is {target} sequences per step; at world {world} this launch uses "
                f"train.micro_batch={micro} x train.grad_accum={accum} (the config gave {B} x {A} x {world} "
                f"= {now})"
            )
    raise AssertionError("unreachable: (target / world, 1) always fits")


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Build ``tp`` (a dataclass or a simple annotation) from YAML data, with clear errors."""
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        for key in value:
            if key not in names:
                full = f"{where + '.' if where else ''}{key}"
                near = difflib.get_close_matches(str(key), names, n=1)
                hint = f"; did you mean {where + '.' if where else ''}{near[0]}?" if near else ""
                raise ConfigError(f"unknown key {full}{RENAMED.get(full, hint)}")
        kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in value.items()}
        try:
            return tp(**kwargs)
        except TypeError as e:  # e.g. a field given a value of a type the dataclass cannot take
            raise ConfigError(f"{where or 'config'}: {e}") from None
    if tp is int and isinstance(value, float):
        # why here: YAML 1.2 reads 2e4 and 2.5 as floats; an integer field refuses both in one place, for
        # files and overrides alike, before a float count reaches code that runs after the process group
        raise ConfigError(f"{where} must be an integer, got {value!r} (float)")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _convert(args[0], value, where)
    return value  # scalars and containers: each section's __post_init__ checks type and range


def config_from_dict(data: dict) -> RunConfig:
    data = dict(data or {})
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("moe", {}), dict):
        # moe.d_model follows model.d_model unless given (then it must match)
        model = dict(model)
        model["moe"] = {"d_model": model.get("d_model", ModelConfig.d_model), **model.get("moe", {})}
        data["model"] = model
    return _convert(RunConfig, data, "")


def apply_override(data: dict, dotted: str) -> None:
    """``a.b.c=value`` sets data[a][b][c]; the value is parsed as YAML (numbers, bools, null, lists)."""
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r} must look like key.sub=value")
    key, raw = dotted.split("=", 1)
    parts = key.strip().split(".")
    node, tp, where = data, RunConfig, ""
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(tp)]
        if part not in names:
            near = difflib.get_close_matches(part, names, n=1)
            hint = f"; did you mean {where}{near[0]}?" if near else ""
            raise ConfigError(f"unknown key {where}{part}{RENAMED.get(where + part, hint)}")
        if i == len(parts) - 1:
            node[part] = parse_yaml(raw)
            return
        tp = typing.get_type_hints(tp)[part]
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{where}{part} is not a section; cannot set {key}")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}{part} must be a mapping")
        where += part + "."


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = parse_yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
    for item in overrides or []:
        apply_override(data, item)
    return config_from_dict(data)


def config_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def dump_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(config_yaml(cfg))
