"""Export a ``model.kind: hf`` run back to a transformers ``save_pretrained`` directory:

    python -m moe_dist.export_hf runs/<name> OUT_DIR [--step N]

The model is built from the resolved config stored in the checkpoint's manifest (the run directory's
``config.yaml`` may have been edited since; it is read only for checkpoints that predate stored configs).
No process group: the checkpoint's files are read directly (``dense.pt`` and every ``experts_ep{e}.pt``,
verified against the manifest), the experts concatenated in EP-rank order (rank e holds the contiguous
slice [e*N/ep, (e+1)*N/ep)), and each MoE layer written back in its transformers block's layout.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from torch import nn

from moe_dist.checkpoint.files import CheckpointError, checkpoint_dirs, load_obj, verify
from moe_dist.checkpoint.names import DENSE, experts_file, step_of
from moe_dist.errors import ConfigError
from moe_dist.training.config import RunConfig, config_from_dict, load_config

log = logging.getLogger("moe_dist.export_hf")


def _checkpoint(run_dir: Path, step: int | None) -> Path:
    dirs = checkpoint_dirs(run_dir / "checkpoints")
    if step is not None:
        dirs = [d for d in dirs if step_of(d.name) == step]
    if not dirs:
        raise CheckpointError(f"no checkpoint{'' if step is None else f' at step {step}'} under {run_dir}")
    return dirs[-1]


def checkpoint_state(ckpt: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state of ``model`` (every expert local) from a checkpoint: dense params and buffers, and
    every expert, whatever the EP size that wrote it."""
    from moe_dist.checkpoint.global_state import join_model

    manifest = verify(ckpt)
    if int(manifest.get("format", 1)) >= 2:  # per-expert keys (moe_dist/global_state.py)
        experts: dict[str, torch.Tensor] = {}
        for name in manifest["experts"]:
            experts.update(load_obj(ckpt / name)["model"])
        return join_model(model, load_obj(ckpt / DENSE)["model"], experts)
    state = dict(load_obj(ckpt / DENSE))
    shards = [load_obj(ckpt / experts_file(e)) for e in range(int(manifest["ep"]))]
    for key in shards[0]:
        state[key] = torch.cat([s[key] for s in shards])  # why cat on dim 0: EP ranks hold contiguous experts
    return state


def load_run_model(run_dir: str | Path, step: int | None = None) -> nn.Module:
    """The run's model (``HFCausalLM``), every expert on one process, from its newest checkpoint."""
    from moe_dist.models.hf import HFCausalLM, build_hf_model, parallelize_hf_model

    run_dir = Path(run_dir)
    ckpt = _checkpoint(run_dir, step)
    cfg = checkpoint_config(ckpt, run_dir)
    if cfg.model.kind != "hf":
        raise ConfigError(f"run {run_dir} has model.kind={cfg.model.kind!r}; only kind=hf runs export")
    hf = build_hf_model(cfg.model.hf_config, cfg.train.seed, cfg.model.seq_len)
    model = HFCausalLM(parallelize_hf_model(hf, None, **cfg.model.hf_moe))
    model.load_state_dict(checkpoint_state(ckpt, model), strict=True)
    return model


def checkpoint_config(ckpt: Path, run_dir: Path) -> RunConfig:
    """The config the checkpoint was written under (its manifest's), else the run's config.yaml."""
    saved = verify(ckpt, []).get("config")
    if saved is None:
        log.warning("checkpoint %s stores no config (an older version wrote it): using config.yaml", ckpt)
        return load_config(run_dir / "config.yaml")
    return config_from_dict(saved)


def export(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    """Write the run's model as a transformers ``save_pretrained`` directory; returns ``out_dir``."""
    from moe_dist.models.hf import unparallelize_hf_model

    model = load_run_model(run_dir, step)
    hf = unparallelize_hf_model(model.hf)
    hf.save_pretrained(out_dir)
    log.info("exported %s to %s", run_dir, out_dir)
    return Path(out_dir)


EXAMPLE = "example: moe-dist export-hf runs/hf_demo exported/ --step 100"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m moe_dist.export_hf", description=__doc__.split("\n")[0], epilog=EXAMPLE
    )
    parser.add_argument("run_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s: %(message)s")
    export(args.run_dir, args.out_dir, args.step)


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, CheckpointError) as e:
        logging.getLogger("moe_dist").error("%s: %s", type(e).__name__, e)
        sys.exit(2)
