"""What torch's weights-only unpickler refused, in words (checkpoint loading and the spawner read it)."""

from __future__ import annotations

import re

# how torch's weights-only unpickler names the global it refused (torch 2.6-2.13), most common form first
_REFUSED_PATTERNS = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module"),
    re.compile(r"call reduce for unrecognized function (.+?)(?: which belongs to .*)?$", re.M),
    re.compile(r"allowlisted via `add_safe_globals`,? but got (.+)$", re.M),
)


def refused_name(message: str) -> str:
    """What torch's UnpicklingError message says was refused: the global it names, else its own words."""
    for pattern in _REFUSED_PATTERNS:
        m = pattern.search(message)
        if m:
            return m.group(1).strip()
    m = re.search(r"WeightsUnpickler error:\s*(\S.*)$", message, re.M)
    detail = m.group(1).strip() if m else (message.strip().splitlines() or ["?"])[-1]
    return f"something the safe loader does not accept ({detail})"
