"""Destroy the process groups at interpreter exit, so that scripts which never call
``dist.destroy_process_group()`` still exit 0.

Root cause this guards against (torch 2.13, gloo; a core dump shows it): a gloo worker thread
(``ProcessGroupGloo::runLoop``) drops its reference to a finished collective's work object *after* the
caller's ``wait()`` has returned. The work holds tensors that have Python objects, so its destructor takes
the GIL. When the main thread has reached ``Py_FinalizeEx`` by then, ``take_gil`` ends the worker thread
with ``pthread_exit``; the forced unwind crosses the work's ``noexcept`` destructor and the C++ runtime
calls ``std::terminate`` ("terminate called without an active exception", SIGABRT). It is a race, so only
some exits abort. Destroying the groups in an ``atexit`` hook runs before finalization starts: gloo joins
its threads with the GIL released, so every pending work is released while Python can still take it.
"""

from __future__ import annotations

import atexit
import logging
import sys

import torch.distributed as dist

log = logging.getLogger(__name__)

_registered = False


def destroy_process_groups_at_exit() -> None:
    """Register (once per process) an exit hook that calls ``dist.destroy_process_group()`` if a default
    group still exists then. Idempotent; a script that destroys its groups itself is left alone.
    """
    global _registered
    if not _registered:
        atexit.register(_destroy_at_exit)
        _registered = True


def _destroy_at_exit() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        return
    if getattr(sys, "last_value", None) is not None:
        # why: after an uncaught exception a collective of ours may still be in flight; gloo's teardown
        # would wait for it up to the group timeout, turning a failed rank into a hung one
        return
    log.debug("destroying the process groups at exit")
    dist.destroy_process_group()
