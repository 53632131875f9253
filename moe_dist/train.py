"""Entry point, the same under torchrun and the deepspeed launcher:

python -m moe_dist.train CONFIG.yaml [key.sub=value ...]

Without a launcher (no RANK in the environment) a config with parallel.ep=1 runs as one process; one
that needs several ranks says how to launch it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import timedelta
from typing import TYPE_CHECKING

# why only torch-free imports up here: under mimalloc the process re-executes itself once at start-up, and
# importing torch before that (seconds per rank) would be paid twice
from moe_dist.errors import CheckpointError, ConfigError
from moe_dist.runtime.hostmem import reexec_with_allocator
from moe_dist.runtime.net import free_port
from moe_dist.training.config import RunConfig, load_config
from moe_dist.training.data_check import check_data

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

log = logging.getLogger("moe_dist.train")


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s %(levelname)s: %(message)s",
        force=True,
    )


def init_distributed(cfg: RunConfig) -> tuple[torch.device, str]:
    """Process group from the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    import torch
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and cfg.parallel.backend != "gloo"
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend=nccl needs CUDA devices; use gloo (or auto) on CPU")
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=cfg.parallel.timeout_s)
    if cfg.engine == "deepspeed":
        from moe_dist.training.deepspeed_engine import quiet_deepspeed

        quiet_deepspeed(device)
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    elif "TORCHELASTIC_RESTART_COUNT" in os.environ:
        dist.init_process_group(
            backend,
            store=_attempt_store(timeout),
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=timeout,
        )
    else:
        dist.init_process_group(backend, timeout=timeout)
    return device, backend


def _attempt_store(timeout: timedelta) -> dist.Store:
    """The launcher's store under a prefix of our own per restart attempt.

    why: under torchrun --max-restarts (torch 2.13, gloo), the restarted workers' env:// rendezvous read
    the previous attempt's peer addresses and fail in connectFullMesh; a fresh prefix per attempt avoids it.
    """
    import torch.distributed as dist

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "False") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=not agent_hosts and int(os.environ["RANK"]) == 0,
        timeout=timeout,
    )
    return dist.PrefixStore(f"moe_dist/attempt_{attempt}", store)


def leave_together(timeout_s: float = 30.0) -> None:
    """A launch refused before any process group exists: wait, bounded, until every rank has said why.

    why: every rank reaches the same refusal, but at its own pace (imports take seconds on a busy host);
    the launcher kills the stragglers as soon as the first rank exits, so without this only the fastest
    rank's line would be printed. The launcher's store counts the ranks; nothing here can hang or raise.
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1 or "MASTER_ADDR" not in os.environ:
        return
    try:
        store = _attempt_store(timedelta(seconds=timeout_s))
        arrived = store.add("refused", 1)
        deadline = time.monotonic() + timeout_s
        while arrived < world and time.monotonic() < deadline:
            time.sleep(0.05)
            arrived = store.add("refused", 0)
    except Exception as e:  # noqa: BLE001 - best effort: the error line is already out
        log.debug("could not wait for the other ranks: %s", e)


def check_same_config(cfg: RunConfig) -> None:
    """Ranks launched with different configs are named, before any model collective."""
    import torch.distributed as dist

    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, cfg.digest())
    if len(set(digests)) > 1:
        groups: dict[str, list[int]] = {}
        for r, d in enumerate(digests):
            groups.setdefault(d, []).append(r)
        detail = "; ".join(f"ranks {rs} have config {d}" for d, rs in groups.items())
        raise ConfigError(f"ranks disagree on the resolved config: {detail}")


def single_process_env(cfg: RunConfig, argv: list[str]) -> None:
    """No launcher: run as a world of one if the config allows it, else say how to launch."""
    if cfg.parallel.ep > 1:
        n = cfg.parallel.ep
        raise ConfigError(
            f"parallel.ep={n} needs {n} ranks (or a multiple) and no launcher started this process; run "
            f"`torchrun --nproc-per-node {n} -m moe_dist.train {' '.join(argv)}` (or the deepspeed "
            f"launcher), or add parallel.ep=1 to train as one process"
        )
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    log.info("no launcher found (RANK is not set): training as a single process")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    # the deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    rank = int(os.environ.get("RANK", 0))
    setup_logging(rank)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)  # noqa: T201 - usage text for the command line
        return {}
    path = argv[0] if not argv[0].count("=") else None
    overrides = argv[1:] if path else argv
    # every check that needs no process group runs before one exists
    cfg = load_config(path, overrides)
    if "RANK" not in os.environ:
        single_process_env(cfg, argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    cfg.check_world(world)
    check_data(cfg)  # a bad data path or a vocab the model cannot hold fails here, before any process group
    # before the preflight, so that its warnings are logged once (by the process that goes on)
    reexec_with_allocator(cfg.train.retain_host_memory, cfg.parallel.backend)  # before any process group
    import torch.distributed as dist

    from moe_dist.moe.parallel import ParallelLayout
    from moe_dist.training.preflight import preflight

    finished = preflight(cfg, world, rank)  # refuses an incompatible checkpoint on every rank alike
    if finished is not None:
        return finished
    device, backend = init_distributed(cfg)
    try:
        check_same_config(cfg)
        layout = ParallelLayout.build(cfg.parallel.ep)
        from moe_dist.training.trainer import Trainer

        return Trainer(cfg, layout, device).train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, CheckpointError) as e:
        # why exit 2 with one line: every rank takes the same decision, so each says it once and leaves
        logging.getLogger("moe_dist").error("%s: %s", type(e).__name__, e)
        dist_mod = sys.modules.get("torch.distributed")
        if dist_mod is None or not dist_mod.is_initialized():
            leave_together()
        sys.exit(2)
