"""Start TensorBoard with torch-tb-profiler taught that all-to-all is a collective.

Why: expert parallelism moves tokens with ``all_to_all_single``, but torch-tb-profiler 0.4.3 only
treats names in two module-level lists of ``torch_tb_profiler/profiler/trace.py`` as communication:
``GlooOpNameSet`` / ``NcclOpNameSet`` (broadcast, reduce, all_reduce, all_gather, reduce_scatter).
Every place that decides "is this a collective" reads those two lists: ``trace.create_trace_event``
(keeps the ``user_annotation`` range at all), ``node.create_operator_node``,
``event_parser.NodeParserMixin._parse_node`` (builds the ``CommunicationNode`` behind the
Distributed view's comm-ops / wait-time tables) and ``event_parser.StepParser._parse_step``
(communication time for the overlap chart). ``communication.py``, ``loader.py``, ``run_generator.py``
and ``data.py`` have no name lists of their own. So the ``gloo:all_to_all`` range a gloo
``all_to_all_single`` records (a ``user_annotation`` on gloo's worker thread; torch 2.13 CPU) is
dropped, and the Distributed view shows all_reduce only.

What: :func:`patch_plugin` appends ``gloo:all_to_all`` and ``nccl:all_to_all`` (the profiling
titles ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` use for ``alltoall_base`` and ``alltoall``) to
those lists *in place*: ``event_parser`` and ``node`` did ``from .trace import ...``, so they hold
the same list objects and rebinding the names would miss them. The ``c10d::alltoall_base_``
``cpu_op`` is deliberately not added: it only enqueues the work on the caller thread, and counting
it as well would count every all-to-all twice.

One catch: the plugin parses each trace file in a child process started with the ``spawn`` method
(``TORCH_PROFILER_START_METHOD``), which re-imports the plugin unpatched. So the patch also wraps
``torch_tb_profiler.profiler.loader.Process``: the child runs :func:`_run_patched`, which re-applies
the patch before the plugin's own parsing target. Nothing of the plugin is forked or copied.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

#: profiler range names of all-to-all collectives, keyed by the plugin list they belong in
ALL_TO_ALL_OP_NAMES: dict[str, tuple[str, ...]] = {
    "GlooOpNameSet": ("gloo:all_to_all",),
    "NcclOpNameSet": ("nccl:all_to_all",),
}

_added: list[str] = []  # names this module inserted, so repeated calls report the same thing


def _run_patched(target: Callable[..., Any], *args: Any) -> Any:
    """Body of a plugin trace-parsing child process: patch the fresh import, then parse."""
    patch_plugin()
    return target(*args)


def patch_plugin() -> list[str]:
    """Make torch-tb-profiler count all-to-all as a collective; return the op names the patch added.

    Idempotent: later calls change nothing and return the same names. Names the installed plugin
    already knows are not added (and not returned).
    """
    from torch_tb_profiler.profiler import loader, trace

    for attr, names in ALL_TO_ALL_OP_NAMES.items():
        op_names = getattr(trace, attr)  # a list in 0.4.3; must be mutated, never rebound
        for name in names:
            if name in op_names:
                continue
            if isinstance(op_names, set):
                op_names.add(name)
            else:
                op_names.append(name)
            _added.append(name)
            logger.info("torch-tb-profiler: counting %s as a collective (%s)", name, attr)

    if not getattr(loader.Process, "_all_to_all_patched", False):
        spawn_process = loader.Process

        def process(*, target: Callable[..., Any], args: tuple = (), **kwargs: Any) -> Any:
            return spawn_process(target=_run_patched, args=(target, *args), **kwargs)

        process._all_to_all_patched = True  # type: ignore[attr-defined]
        loader.Process = process
    return list(_added)


EXAMPLE = "example: moe-dist tensorboard --logdir runs/demo/profiler --port 6006"


def main(argv: list[str] | None = None) -> int:
    """``python -m profiling.analysis.tensorboard --logdir DIR [--port N] [--host H] [extra tensorboard
    flags]``."""
    parser = argparse.ArgumentParser(
        prog="python -m profiling.analysis.tensorboard", description=__doc__.split("\n")[0], epilog=EXAMPLE
    )
    parser.add_argument("--logdir", required=True, help="directory holding *.pt.trace.json (one per rank)")
    parser.add_argument("--port", type=int, default=6006)
    parser.add_argument("--host", default="127.0.0.1")
    args, extra = parser.parse_known_args(argv)
    # why root at WARNING: TensorBoard resets werkzeug's logger to inherit the root level, and werkzeug
    # logs every HTTP request at INFO (a line per chart the browser polls); our own lines stay at INFO
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)

    added = patch_plugin()  # before TensorBoard instantiates the plugin and starts loading runs
    logger.info("all-to-all op names added to torch-tb-profiler: %s", added)

    from tensorboard import program

    tb = program.TensorBoard()
    tb.configure(argv=[None, "--logdir", args.logdir, "--port", str(args.port), "--host", args.host, *extra])
    return tb.main()


if __name__ == "__main__":
    raise SystemExit(main())
