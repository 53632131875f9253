"""``engine: deepspeed``: our model inside ``deepspeed.initialize``, expert params registered the way
DeepSpeed's own MoE layer registers them, so its engine reduces them over the expert-data-parallel group.
"""

from __future__ import annotations

import atexit
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_dist.errors import ConfigError
from moe_dist.moe.layer import moe_layers
from moe_dist.moe.parallel import ParallelLayout
from moe_dist.moe.placement import DEEPSPEED_REFUSES_BALANCED, DEEPSPEED_REFUSES_REPLICAS
from moe_dist.moe.sync import expert_params
from moe_dist.training.config import RunConfig
from moe_dist.training.engine import EngineCheckpoint, autocast_ctx, lr_lambda, param_groups
from moe_dist.training.memory import watch_step_grads

log = logging.getLogger(__name__)


def deepspeed_config(cfg: RunConfig, world: int, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed JSON config generated from the YAML (``deepspeed.extra`` is merged last)."""
    t = cfg.train
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        # why: we hand DeepSpeed a torch AdamW (its fused Adam needs CUDA), which ZeRO calls "untested"
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": device.type == "cuda" and t.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    ds.update(cfg.deepspeed.extra)
    return ds


DEPRECATED_BY_DEEPSPEED = r"`torch\.distributed\.all_gather_into_tensor` is deprecated"
"""DeepSpeed's ZeRO calls it each step; torch warns once per rank, two lines each ("return func(...)")."""


def quiet_deepspeed(device: torch.device) -> None:
    """Silence what DeepSpeed prints on every launch that is noise to our users, keeping real warnings:

    - the FutureWarning torch raises for DeepSpeed's own ``all_gather_into_tensor`` call (ours do not call
      it, and the user can do nothing about it); every other warning still shows;
    - on CPU, "Setting accelerator to CPU. If you have GPU ... we were unable to detect it", which
      DeepSpeed logs at import when ``DS_ACCELERATOR`` is unset: we set it to ``cpu`` for a CPU run (a user's
      own value is kept). The deepspeed launcher's own process logs it before our code runs.

    Call before ``import deepspeed``."""
    warnings.filterwarnings("ignore", message=DEPRECATED_BY_DEEPSPEED, category=FutureWarning)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def checkpoint_globals() -> list[type]:
    """The non-container types in a rank file of ``engine: deepspeed``, allowlisted when it is loaded.

    We checkpoint DeepSpeed's state ourselves (its optimizer's and scheduler's state_dict through
    ``moe_dist.checkpoint.files``), never through ``engine.save_checkpoint``/``load_checkpoint``, whose
    checkpoint engine unpickles with ``weights_only=False``. The ZeRO 1/2 optimizer's state_dict holds a
    ``LossScaler``, a ``ZeroStageEnum`` and ``fragment_address`` slices; its bf16 optimizers for ZeRO 0 (on
    CUDA) hold the slices or plain data only (read in deepspeed 0.19.8's source; only ZeRO 2 on CPU is
    tested). None runs code when built: plain attributes, an int enum, a dataclass. fp16's
    ``DynamicLossScaler`` is not listed: fp16 is no option of ours.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _moe_marker(num_experts: int, group_name: str) -> nn.Module:
    """A parameter-free module that DeepSpeed's engine counts as an MoE layer.

    why: DeepSpeed turns on its expert-gradient path only when it finds an instance of its own
    ``deepspeed.moe.layer.MoE`` in the model; our layers register their params the same way but are not
    that class. The marker holds no params, never runs forward, and the process groups already exist.
    """
    from deepspeed.moe.layer import MoE

    class _DeepSpeedMoEMarker(MoE):
        def __init__(self) -> None:
            nn.Module.__init__(self)
            self.num_experts, self.expert_group_name = num_experts, group_name

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass

    return _DeepSpeedMoEMarker()


def refuse_replicas(model: nn.Module) -> None:
    """Raise ConfigError (one line) if any MoE layer of ``model`` has a replicated placement."""
    if any(m.placement.is_replicated() for m in moe_layers(model)):
        raise ConfigError(DEEPSPEED_REFUSES_REPLICAS)


def shm_buffer_path(rank: int) -> Path:
    """The POSIX shared-memory file DeepSpeed's CPU all-reduce creates for ``rank`` of this launch
    (``deepspeed/ops/csrc/cpu/comm/shm.cpp``: ``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffer(rank: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory all-reduce buffer (66 MB). DeepSpeed never does, so every
    CPU launch left one such file per rank in /dev/shm until memory ran out. Peers that still map the
    buffer keep their mapping (POSIX unlink semantics)."""
    try:
        shm_buffer_path(rank).unlink(missing_ok=True)
    except OSError as e:  # a cleanup must not turn a finished run into a failed one
        log.warning("could not remove DeepSpeed's shared-memory buffer: %s", e)


class DeepSpeedEngine:
    norm_is_global = False
    """DeepSpeed's norm comes from its own reductions: the trainer agrees on its finiteness."""
    can_skip_step = False
    """DeepSpeed steps its optimizer inside backward, before any check of ours could skip it."""
    reshards = False
    """Its rank files hold ZeRO partitions of the layout that wrote them."""

    def __init__(
        self, model: nn.Module, cfg: RunConfig, layout: ParallelLayout, device: torch.device
    ) -> None:
        refuse_replicas(model)  # before deepspeed is imported or touches a group
        if cfg is not None and cfg.parallel.placement == "balanced":  # RunConfig refuses it first
            raise ConfigError(DEEPSPEED_REFUSES_BALANCED)
        quiet_deepspeed(device)
        import deepspeed
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
        from deepspeed.utils import groups

        self.cfg, self.layout, self.device = cfg, layout, device
        ep = layout.ep
        group_name = f"ep_size_{ep}"
        if group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(ep)
        # why assert: DeepSpeed reduces expert grads over ITS groups; they must hold the ranks ours do
        ds_edp = dist.get_process_group_ranks(groups._get_expert_data_parallel_group(group_name))
        if ds_edp != layout.edp_ranks(layout.ep_rank):
            raise RuntimeError(
                f"DeepSpeed's expert-data-parallel ranks {ds_edp} differ from ours "
                f"{layout.edp_ranks(layout.ep_rank)}"
            )
        for p in expert_params(model):
            p.allreduce = False  # DeepSpeed's marker for expert params (deepspeed.moe.utils.is_moe_param)
            p.group_name = group_name
        groups_ = split_params_into_different_moe_groups_for_optimizer(
            param_groups(model, cfg.optim.weight_decay)
        )
        model.add_module("deepspeed_moe_marker", _moe_marker(cfg.model.moe.num_experts, group_name))
        o = cfg.optim
        optimizer = torch.optim.AdamW(groups_, lr=o.lr, betas=(o.beta1, o.beta2))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.ds_config = deepspeed_config(cfg, layout.world, device)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        self.model = model
        watch_step_grads(self.optimizer)  # summary.json's grads: the partitions ZeRO's AdamW steps on
        self._last_norm = 0.0
        self.replica_sync_s = 0.0  # replicas are refused above: nothing to sync
        self.grad_norm_known = False
        """Whether the last ``step`` read a grad norm from DeepSpeed (only then is a NaN one non-finite)."""
        # why only now: initialize() broadcast the parameters, so every peer has mapped our buffer already
        atexit.register(release_shm_buffer, dist.get_rank())

    def forward(self, idx: Tensor):
        with autocast_ctx(self.cfg, self.device):
            return self.engine(idx)

    def backward(self, loss: Tensor) -> None:
        # DeepSpeed scales by 1/gradient_accumulation_steps itself; step() only updates at the boundary
        self.engine.backward(loss)
        self.engine.step()

    def step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        # why: DeepSpeed reports no norm for some optimizers; NaN then means "unknown", not "non-finite"
        self.grad_norm_known = norm is not None
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.cfg.deepspeed.zero_stage > 0:
            # ZeRO reads its own partition as state_dict_list[dp_rank]; this rank saved only its own
            dp_world = self.engine.dp_world_size
            self.optimizer.load_state_dict([state["optimizer"]] * dp_world)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def checkpoint_state(self) -> EngineCheckpoint:
        return EngineCheckpoint(own={"engine": self.state_dict()})  # ZeRO partitions: bound to this layout

    def load_checkpoint_state(
        self, dense: dict[str, Any], experts_opt: dict[str, Any], own: dict[str, Any]
    ) -> None:
        self.load_state_dict(own["engine"])

    def checkpoint_globals(self) -> list[type]:
        return checkpoint_globals()
