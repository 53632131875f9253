"""Export a ``model.kind: hf`` run back to a transformers ``save_pretrained`` directory:

    python -m moe_dist.export_hf runs/<name> OUT_DIR [--step N] [--dtype auto|float32|bfloat16|float16]

The model is built from the resolved config stored in the checkpoint's manifest (the run directory's
``config.yaml`` may have been edited since; it is read only for checkpoints that predate stored configs).
No process group: the checkpoint's files are read directly (``dense.pt`` and every ``experts_ep{e}.pt``,
verified against the manifest), the experts concatenated in EP-rank order (rank e holds the contiguous
slice [e*N/ep, (e+1)*N/ep)), and each MoE layer written back in its transformers block's layout.

A run started from ``model.hf_pretrained`` with ``train.steps=0`` (a conversion run) exports the checkpoint it
read, tensor for tensor: ``--dtype auto`` writes the source config's dtype (a bf16 checkpoint trains in fp32
and goes back to bf16), and the source directory's tokenizer files are copied beside the weights (from the
run directory's copy, ``hf_model/``, when it has one: the source may have moved since). OUT_DIR
must not exist or be empty; it is written beside itself and renamed into place once complete.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from moe_dist.checkpoint.files import CheckpointError, checkpoint_dirs, load_obj, verify
from moe_dist.checkpoint.model_files import MODEL_FILES, TOKENIZER_FILES, model_files_dir
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
    """The config the checkpoint was written under (its manifest's), else the run's config.yaml. The model
    directory it names is read from the run directory's copy (``hf_model/``: config.json and tokenizer
    files, moe_dist/checkpoint/model_files.py) when the run has one, so the original may have moved."""
    saved = verify(ckpt, []).get("config")
    if saved is None:
        log.warning("checkpoint %s stores no config (an older version wrote it): using config.yaml", ckpt)
        return load_config(run_dir / "config.yaml")
    model = dict(saved.get("model") or {})
    stored = model_files_dir(run_dir, model)
    if isinstance(model.get("hf_config"), str) and stored == run_dir / MODEL_FILES:
        model["hf_config"] = str(stored)
        if model.get("hf_pretrained"):
            model["hf_pretrained"] = str(stored)
        saved = {**saved, "model": model}
    return config_from_dict(saved)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_dtype(cfg: RunConfig, dtype: str = "auto") -> torch.dtype:
    """``dtype`` by name; "auto": the source config's (``config.json``'s dtype), float32 if it names none."""
    from moe_dist.models.hf_config import hf_config_from

    if dtype != "auto":
        if dtype not in DTYPES:
            raise ConfigError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    source = getattr(hf_config_from(cfg.model.hf_config), "dtype", None)
    if isinstance(source, str):
        source = DTYPES.get(source)
    return source if source in DTYPES.values() else torch.float32


def export(run_dir: str | Path, out_dir: str | Path, step: int | None = None, dtype: str = "auto") -> Path:
    """Write the run's model as a transformers ``save_pretrained`` directory; returns ``out_dir``."""
    from moe_dist.models.hf import unparallelize_hf_model

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"export: {out_dir} exists and is not an empty directory; name a new one")
    ckpt = _checkpoint(Path(run_dir), step)
    cfg = checkpoint_config(ckpt, Path(run_dir))
    to = export_dtype(cfg, dtype)
    model = load_run_model(run_dir, step)
    hf = unparallelize_hf_model(model.hf).to(to)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # why a sibling directory and a rename: an interrupted export leaves no half-written OUT_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        hf.save_pretrained(tmp)
        source = Path(cfg.model.hf_config) if isinstance(cfg.model.hf_config, str) else None
        for name in TOKENIZER_FILES if source is not None else ():
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s (%s) to %s", ckpt, str(to).removeprefix("torch."), out_dir)
    return out_dir


EXAMPLE = "example: moe-dist export-hf runs/hf_demo exported/ --step 100"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_dist.export_hf", description=__doc__.split("\n")[0], epilog=EXAMPLE
    )
    parser.add_argument("run_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="the weights' dtype (default auto: the source config's, float32 if it names none)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s: %(message)s")
    try:
        export(args.run_dir, args.out_dir, args.step, args.dtype)
    except (ConfigError, CheckpointError) as e:  # one line, as python -m and moe-dist export-hf both print it
        logging.getLogger("moe_dist").error("%s: %s", type(e).__name__, e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
