"""libkineto writes a line to stderr at every torch.profiler start and stop; keep the console readable."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def without_kineto_markers() -> Iterator[None]:
    """Within the block, drop the lines libkineto writes to fd 2 at every profiler start and stop
    ("USDT:<time> <pid>:<tid> SyncActivityProfilerHandler.cpp:52] profiler_start"); every other line
    written to stderr meanwhile (errors, warnings) is passed on after the block."""
    # why not KINETO_LOG_LEVEL: those markers sit above kineto's ERROR level, so silencing them drops errors
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().splitlines(keepends=True) if not line.startswith(b"USDT:")]
            if kept:
                sys.stderr.buffer.write(b"".join(kept))
                sys.stderr.flush()
