"""Launch the README's layer pattern (``launch/layer_example.py``: groups from ``dist.new_group``, the
layer, three optimizer steps) as many 2-rank jobs that each end with an explicit
``dist.destroy_process_group()``, and report every rank's exit status.

    python tests/exit_launches.py LAUNCHES CONCURRENT [none|destroy|destroy_more]

why fork: a fresh interpreter per rank spends ~2 s of CPU importing torch, 80 s for 20 launches on 2 cores.
This process imports everything once and forks each rank; a forked rank runs the script's pattern, then
leaves ``main`` and ends like any script, through the interpreter's finalization (the exit that aborted).
Prints one line: ``exit statuses: [...]`` (0 = clean; negative = killed by that signal; 6 = SIGABRT).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))
import layer_example  # noqa: E402  (the README's script, imported: its imports are done before forking)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moe_dist import MoEConfig, ParallelLayout  # noqa: E402

# why: AdamW's first construction imports torch._dynamo (seconds); done once here, not in every rank
torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(launches: int, concurrent: int) -> tuple[int, int] | None:
    """Fork the ranks; in a forked rank return (rank, port), in this process return None when all ended."""
    statuses: list[int] = []
    for first in range(0, launches, concurrent):
        pids = []
        for _ in range(first, min(first + concurrent, launches)):
            port = _free_port()
            for rank in range(2):
                pid = os.fork()
                if pid == 0:
                    return rank, port
                pids.append(pid)
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            statuses.append(os.waitstatus_to_exitcode(status))
    print(f"exit statuses: {statuses}", flush=True)  # noqa: T201 - the parent's report
    return None


def run_rank(rank: int, port: int, ending: str) -> tuple:
    """The README's pattern with layer_example's pieces, written as a user's script does: the layer, its
    layout and the last output are still held when the script destroys the process group, and live on to
    the interpreter's exit. Returns them (the caller keeps them at module level)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    layout = ParallelLayout.build(ep=layer_example.EP)  # dist.new_group groups
    cfg = MoEConfig(d_model=64, d_ff=128, num_experts=8, top_k=2, aux_loss_coef=1e-2)
    layer = layer_example.build_layer(cfg, layout, torch.device("cpu"))
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    for _ in range(3):
        x_TD = torch.randn(32, cfg.d_model)
        out = layer(x_TD)
        loss = F.mse_loss(out.hidden, x_TD.flip(-1)) + out.aux_loss
        layer_example.optimizer_step(layer, optimizer, loss, layout)
    out = layer(torch.randn(32, cfg.d_model))  # an output (and its graph) kept past the destroy
    layer_example.check_router_replicated(layer, layout)
    if ending in ("destroy", "destroy_more"):
        dist.destroy_process_group()
    if ending == "destroy_more":
        torch.randn(64, 64) @ torch.randn(64, 64)
    return layer, layout, out


if __name__ == "__main__":
    job = main(int(sys.argv[1]), int(sys.argv[2]))
    if job is not None:
        kept = run_rank(*job, sys.argv[3] if len(sys.argv) > 3 else "destroy")  # held until the exit
