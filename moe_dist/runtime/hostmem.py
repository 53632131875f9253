"""CPU hosts: keep freed memory in the process so each step's large tensors reuse their pages.

why: glibc serves blocks of 32 MB and more with mmap and unmaps them on free, so a training step that
allocates its activations and its expert-weight gradients afresh (E x d_model x d_ff floats per matrix)
page-faults on every first touch of them; we measured ~30 ms per 64 MB on our CPU machine, a third of the
expert weight-gradient GEMM at E=128. CUDA's caching allocator already keeps device memory; this is the
host-side analogue.

The mechanism is mimalloc (the ``cmeel-mimalloc`` wheel) loaded with LD_PRELOAD and told never to purge
freed memory (``MIMALLOC_PURGE_DELAY=-1``). LD_PRELOAD only acts when a process starts, so the entry point
re-executes itself once (same PID, argv and environment, plus those variables): ``reexec_with_allocator``.
Spawned children (the benchmark's ranks) get the same variables from ``allocator_env``.

glibc's own knobs (``retain_freed_memory``: M_MMAP_MAX=0, M_TRIM_THRESHOLD max) are only the fallback where
mimalloc is missing or the process cannot re-execute: torch allocates with posix_memalign(64, n), and
glibc's memalign asks for n + 64 + MINSIZE bytes, so a freed block of exactly n pinned from above by a
small allocation is too small for the next identical request; the heap then grows into fresh pages. Whether
that happens depends on the randomised heap address, so it held in about half of the launches only.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.metadata
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

log = logging.getLogger("moe_dist")

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

MARKER = "MOE_DIST_HOST_ALLOCATOR"
"""Set in a process started under the allocator: it never re-executes again (no loop)."""
# why -1: mimalloc's default purges (decommits) freed memory after 1 s, and the next step faults it in again
MIMALLOC_OPTIONS = {"MIMALLOC_PURGE_DELAY": "-1"}


def mimalloc_library() -> str | None:
    """The libmimalloc.so of the installed ``cmeel-mimalloc`` wheel; None off Linux or when not installed."""
    if sys.platform != "linux":
        return None
    try:
        dist = importlib.metadata.distribution("cmeel-mimalloc")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name == "libmimalloc.so":
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return str(path)
    return None


def allocator_env(base: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """``base`` (default: this process's environment) plus what starts a process under mimalloc with freed
    memory kept; None where mimalloc is not available. Options the user set already are left alone."""
    lib = mimalloc_library()
    if lib is None:
        return None
    env = dict(os.environ if base is None else base)
    preload = env.get("LD_PRELOAD", "")
    if lib not in preload.replace(":", " ").split():
        env["LD_PRELOAD"] = f"{lib}:{preload}" if preload else lib
    for key, value in MIMALLOC_OPTIONS.items():
        env.setdefault(key, value)
    env[MARKER] = "mimalloc"
    return env


def allocator_in_use() -> str:
    """ "mimalloc" when this process's malloc is mimalloc's, else "glibc" (or "system" off glibc)."""
    try:
        lib = ctypes.CDLL(None)
        lib.malloc.restype = ctypes.c_void_p
        probe = getattr(lib, "mi_is_in_heap_region", None)
    except (OSError, AttributeError):
        return "system"
    if probe is not None:
        # why a probe, not the symbol alone: mimalloc may be loaded without replacing malloc
        probe.restype = ctypes.c_bool
        ptr = lib.malloc(64)
        try:
            if probe(ctypes.c_void_p(ptr)):
                return "mimalloc"
        finally:
            lib.free(ctypes.c_void_p(ptr))
    return "glibc" if getattr(lib, "gnu_get_libc_version", None) is not None else "system"


def _launched_as(module: str) -> bool:
    """True when this process was started as ``python [options] -m module ...`` (torchrun and the
    deepspeed launcher start the trainer so); re-executing anything else (pytest, a spawned rank) would
    replace a process we do not own."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    orig = getattr(sys, "orig_argv", [])
    return spec is not None and spec.name == module and "-m" in orig


def reexec_with_allocator(retain: bool, backend: str = "gloo", module: str = "moe_dist.train") -> None:
    """Make this process keep freed host memory; re-executes it under mimalloc when it must (no return).

    Off when ``retain`` is false or the run uses CUDA (``backend`` other than gloo with a GPU present, the
    same rule as ``moe_dist.train.init_distributed``): CUDA's caching allocator keeps device memory. Call it
    before any process group or thread exists. Logs one line naming the allocator in use.
    """
    if not retain:
        return
    if backend != "gloo":
        import torch

        if torch.cuda.is_available():
            return
    if allocator_in_use() == "mimalloc":
        log.info(
            "host allocator: mimalloc (freed memory kept, MIMALLOC_PURGE_DELAY=%s)",
            os.environ.get("MIMALLOC_PURGE_DELAY", "default"),
        )
        return
    env = allocator_env()
    if env is not None and MARKER not in os.environ and _launched_as(module):
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for handler in logging.getLogger().handlers:
            handler.flush()
        # why execve: LD_PRELOAD acts only at process start; the PID stays, so launchers keep tracking it
        os.execve(sys.executable, list(sys.orig_argv), env)
    if env is None:
        why = "cmeel-mimalloc is not installed"
    elif MARKER in os.environ:
        why = f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r} did not load it"
    else:
        why = f"this process was not started as python -m {module}"
    ok = retain_freed_memory()
    log.info("host allocator: glibc%s (no mimalloc: %s)", " with mallopt" if ok else "", why)


@contextlib.contextmanager
def allocator_for_children(retain: bool) -> Iterator[bool]:
    """Within the block, processes started from this one (e.g. spawned ranks) run under mimalloc with
    freed memory kept, when ``retain`` and mimalloc is available; yields whether they will."""
    env = allocator_env() if retain else None
    if env is None:
        yield False
        return
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield True
    finally:
        os.environ.clear()
        os.environ.update(saved)


def retain_freed_memory() -> bool:
    """Serve every block from the heap and never trim it (glibc ``mallopt``); False where unsupported.

    The process keeps its peak heap size, as a caching allocator does. Under mimalloc this does nothing
    (mimalloc already keeps freed memory) and returns True. See the module docstring for why glibc's knobs
    hold only in some launches.
    """
    if allocator_in_use() == "mimalloc":
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        log.info("no glibc mallopt here; freed host memory goes back to the OS")
        return False
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if not ok:
        log.info("mallopt refused; freed host memory goes back to the OS")
    return ok


def refill_faults(mb: int = 64) -> dict[str, int]:
    """Minor page faults of filling an ``mb`` MB tensor right after one was freed ("refill", ~0 when freed
    memory is reused), and of filling one more while the first is alive ("fresh": memory never touched
    before, at least one fault per 2 MB even with transparent huge pages)."""
    import resource

    import torch

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    n = mb << 18  # float32 elements
    a = torch.empty(n)
    a.fill_(1)
    pin = torch.empty(1000)  # a small block allocated after the big one, as a training step does
    del a
    f0 = faults()
    b = torch.empty(n)
    b.fill_(2)
    f1 = faults()
    c = torch.empty(n)
    c.fill_(3)
    f2 = faults()
    del b, c, pin
    return {"refill": f1 - f0, "fresh": f2 - f1}


def main() -> None:
    """``python -m moe_dist.runtime.hostmem [release]``: the trainer's start-up path, then print the
    allocator in use
    and ``refill_faults()`` as JSON (the test of this mechanism runs it in fresh processes)."""
    import json

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    reexec_with_allocator(sys.argv[1:] != ["release"], module="moe_dist.runtime.hostmem")
    print(json.dumps({"pid": os.getpid(), "allocator": allocator_in_use(), **refill_faults()}))  # noqa: T201


if __name__ == "__main__":
    main()
