"""CPU hosts: keep freed memory in the process heap so each step's large tensors reuse their pages.

why: glibc serves blocks of 32 MB and more with mmap and unmaps them on free, so a training step that
allocates its activations and its expert-weight gradients afresh (E x d_model x d_ff floats per matrix)
page-faults on every first touch of them; we measured ~30 ms per 64 MB on our CPU machine, a third of the
expert weight-gradient GEMM at E=128. CUDA's caching allocator already keeps device memory; this is the
host-side analogue of running under jemalloc/tcmalloc, with glibc's own knobs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("moe_dist")

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def retain_freed_memory() -> bool:
    """Serve every block from the heap and never trim it (glibc ``mallopt``); False where unsupported.

    The process keeps its peak heap size, as a caching allocator does.
    """
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
