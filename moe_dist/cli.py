"""The ``moe-dist`` console script: one entry point for the offline tools.

    moe-dist report runs/demo
    moe-dist sweep --nproc 4 --out runs/sweep

Each subcommand runs one module's ``main(argv)`` with the arguments passed through unchanged, so it
takes exactly that module's flags (``moe-dist SUB --help`` prints them, with an example). The table
below maps a subcommand to "module:function" and the module is imported only when its subcommand runs:
this file sits at the top of the house, and nothing in the library or in training imports it or the
offline tools it names.

The multi-rank tools that today run under ``torchrun`` (``sweep``, ``placement-study``) also take
``--nproc N``: outside a launcher, the command re-launches itself as
``python -m torch.distributed.run --nproc-per-node N -m MODULE ARGS``; under one (``LOCAL_RANK`` is set)
it runs the module directly. ``bench-layer`` and ``study`` start their own ranks, so they are never
re-launched: ``study`` has a ``--nproc`` of its own, and ``bench-layer --nproc N`` is its ``--ranks N``.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    target: str
    """"module:function"; the function takes ``argv: list[str]``."""
    help: str
    nproc: int | None = None
    """Default ranks of a tool launched under torchrun; None: the tool runs in this process."""
    nproc_flag: str | None = None
    """The tool's own flag that ``--nproc N`` becomes (a tool that spawns its ranks itself)."""

    @property
    def module(self) -> str:
        return self.target.split(":")[0]


COMMANDS: dict[str, Command] = {
    "report": Command(
        "profiling.analysis.report:main", "straggler report of a run (report.md + report.html)"
    ),
    "whatif": Command("profiling.analysis.whatif:main", "project a run's trace to other EP sizes/placements"),
    "tensorboard": Command(
        "profiling.analysis.tensorboard:main", "TensorBoard with all-to-all as collective"
    ),
    "a2a-bytes": Command("profiling.analysis.a2a_bytes:main", "cross-rank all-to-all bytes of an hf run"),
    "export-hf": Command("moe_dist.export_hf:main", "export an hf run to a save_pretrained directory"),
    "sweep": Command("profiling.bench.sweep:main", "imbalance sweep under a forced routing skew", nproc=4),
    "study": Command("profiling.bench.study:main", "balance vs quality study over balancing methods"),
    "placement-study": Command(
        "profiling.bench.placement_study:main", "placement and replication under a routing skew", nproc=4
    ),
    "bench-layer": Command(
        "profiling.bench.layer:main", "layer benchmark against peers and dense FFNs", nproc_flag="--ranks"
    ),
    "plan": Command("moe_dist.plan:main", "memory per rank of a config at a layout and engine"),
    "prepare-data": Command(
        "moe_dist.prepare_data:main", "tokenize .txt and .jsonl files for data.kind: tokens"
    ),
    "gpu-suite": Command(
        "profiling.bench.gpu_suite:main", "every CUDA check and benchmark in one run (--smoke: on the CPU)"
    ),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: moe-dist COMMAND [ARGS...]   (moe-dist COMMAND --help: its flags and an example)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items()]
    lines += ["", "example: moe-dist report runs/demo"]
    return "\n".join(lines)


def split_nproc(argv: list[str], default: int) -> tuple[int, list[str]]:
    """``--nproc N`` / ``--nproc=N`` taken out of ``argv``; the rest is the module's."""
    nproc, rest, i = default, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--nproc" and i + 1 < len(argv):
            nproc, i = int(argv[i + 1]), i + 2
            continue
        if arg.startswith("--nproc="):
            nproc = int(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    if nproc < 1:
        raise SystemExit(f"error: --nproc must be at least 1, got {nproc}")
    return nproc, rest


def launch_command(cmd: Command, nproc: int, argv: list[str]) -> list[str]:
    # why the module launcher rather than the torchrun script: it is the same interpreter as this one
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "-m",
        cmd.module,
        *argv,
    ]


def resolve(cmd: Command) -> Callable[[list[str]], object]:
    module, func = cmd.target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())  # noqa: T201 - the command's output
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    cmd = COMMANDS.get(name)
    if cmd is None:
        print(f"moe-dist: unknown command {name!r}\n\n{usage()}", file=sys.stderr)  # noqa: T201
        return 2
    if cmd.nproc is not None:
        nproc, rest = split_nproc(rest, cmd.nproc)
        helping = "-h" in rest or "--help" in rest
        if "LOCAL_RANK" not in os.environ and not helping:
            return subprocess.call(launch_command(cmd, nproc, rest))
    if cmd.nproc_flag is not None and any(a == "--nproc" or a.startswith("--nproc=") for a in rest):
        nproc, rest = split_nproc(rest, 0)
        rest = [cmd.nproc_flag, str(nproc), *rest]
    result = resolve(cmd)(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
