"""How much memory this process may still use, and the refusal when a plan predicts more.

Why: a deep model's keys are gigabytes, and a key generation that outgrows the machine is killed
by the kernel (no error, no traceback) minutes in.  The plan predicts its peak
(``program.report.peak_memory``); this module compares it with what is available, honouring a
container's cgroup limit, which ``/proc/meminfo`` does not show.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import InsufficientMemoryError
from .program.report import PROCESS_BYTES

#: caps the memory h33 assumes available (bytes); for a share of a machine, or to test the refusal
LIMIT_ENV = "H33_MEMORY_LIMIT_BYTES"
_CGROUP = Path("/sys/fs/cgroup")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) and anything odd: none


def _cgroup_headroom() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2, else v1); None without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    v2 = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
    if v2 is not None:
        for d in (_CGROUP / v2.lstrip("/"), _CGROUP):
            limit, used = _read_int(d / "memory.max"), _read_int(d / "memory.current")
            if limit is not None and used is not None:
                return limit - used
    v1 = next((line.split(":", 2)[2] for line in lines if line.split(":", 2)[1:2] == ["memory"]), "/")
    for d in (_CGROUP / "memory" / v1.lstrip("/"), _CGROUP / "memory"):
        limit, used = _read_int(d / "memory.limit_in_bytes"), _read_int(d / "memory.usage_in_bytes")
        if limit is not None and used is not None and limit < 1 << 60:  # v1 reports "no limit" as ~2^63
            return limit - used
    return None


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory_bytes() -> int | None:
    """Bytes this process may still allocate: the least of ``H33_MEMORY_LIMIT_BYTES``, the cgroup's
    headroom and ``MemAvailable``; None where none of them can be read."""
    env = os.environ.get(LIMIT_ENV)
    figures = [int(env)] if env else []
    figures += [v for v in (_cgroup_headroom(), _mem_available()) if v is not None]
    return max(0, min(figures)) if figures else None


def check_memory(what: str, predicted_peak: int, override: str) -> None:
    """Raise ``InsufficientMemoryError`` if a step whose peak RSS is predicted at ``predicted_peak``
    (a fresh process's, ``PROCESS_BYTES`` included) needs more beyond that baseline than is available."""
    available = available_memory_bytes()
    if available is not None and predicted_peak - PROCESS_BYTES > available:
        raise InsufficientMemoryError(what, predicted_peak, available, override)
