"""OpenMP defaults that survive a shared CPU, set before OpenFHE (and its OpenMP runtime) loads.

Why: OpenFHE parallelizes with OpenMP, whose threads by default spin while they wait.  With
another process busy on the cores, the ConvNet's 8-image pass went from about 0.2 s to 19 s,
about 10x worse than with passive waiting.  And OpenMP sizes its thread pool from the cores it
can see: in a Kubernetes pod that is the node's cores, not the pod's CPU limit, so a 2-CPU pod on
a 64-core node ran 64 threads that the CFS quota kept throttling.

So, unless the user set them, importing h33_bento sets ``OMP_WAIT_POLICY=PASSIVE`` and
``OMP_NUM_THREADS`` to the CPUs this process may actually use: its affinity mask, capped by a
cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``).  OpenMP reads
them once, when its runtime is loaded, so this must run before ``import openfhe``.
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path
from typing import MutableMapping

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max" (v2) or a malformed file
        return None
    return q / p if q > 0 and p > 0 else None  # v1 writes -1 for "no quota"


def _quota_v2(cgroup_dir: Path, root: Path) -> float | None:
    """The tightest ``cpu.max`` (quota period) from ``cgroup_dir`` up to ``root``, in CPUs."""
    limits = []
    for d in [cgroup_dir, *(p for p in cgroup_dir.parents if p == root or root in p.parents)]:
        quota, _, period = (_read(d / "cpu.max") or "").partition(" ")
        got = _ratio(quota, period)
        if got is not None:
            limits.append(got)
    return min(limits, default=None)


def cgroup_cpu_limit(cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """CPUs this process's cgroup may use (possibly a fraction), or None when there is no quota.

    Inside a container the cgroup namespace makes the container's cgroup the root of the mount;
    outside one, ``/proc/self/cgroup`` names it under the root: both are looked up.
    """
    limits = []
    for line in (_read(proc_self_cgroup) or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        rel = rel.lstrip("/")
        if hierarchy == "0" and controllers == "":  # cgroup v2 (unified hierarchy)
            d = next((c for c in (cgroup_root / rel, cgroup_root) if c.is_dir()), None)
            got = _quota_v2(d, cgroup_root) if d is not None else None
        elif "cpu" in controllers.split(","):  # cgroup v1: the cpu (or cpu,cpuacct) hierarchy
            bases = (cgroup_root / "cpu", cgroup_root / controllers)
            d = next((c for b in bases for c in (b / rel, b) if c.is_dir()), None)
            got = _ratio(_read(d / "cpu.cfs_quota_us") or "", _read(d / "cpu.cfs_period_us") or "") if d else None
        else:
            continue
        if got is not None:
            limits.append(got)
    return min(limits, default=None)


def cpu_budget(affinity: int | None = None, quota: float | None = None) -> int:
    """Threads worth running: the CPUs in the affinity mask, capped by the quota (at least 1).

    A quota of 1.5 CPUs gives 1 thread: a second thread would be throttled for half of every period.
    """
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            affinity = os.cpu_count() or 1
    threads = affinity
    if quota is not None:
        threads = min(threads, math.floor(quota))
    return max(1, threads)


def apply_defaults(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set OMP_WAIT_POLICY and OMP_NUM_THREADS in ``environ`` unless set (non-empty); returns what it set.

    Warns when OpenFHE is already loaded: its OpenMP runtime has read the environment by then.
    """
    wanted = {}
    if not environ.get("OMP_WAIT_POLICY"):
        wanted["OMP_WAIT_POLICY"] = "PASSIVE"
    if not environ.get("OMP_NUM_THREADS"):
        wanted["OMP_NUM_THREADS"] = str(cpu_budget(quota=cgroup_cpu_limit()))
    if wanted and "openfhe" in sys.modules:
        warnings.warn("h33_bento was imported after openfhe: OpenMP has already read its settings, so the safe "
                      f"defaults {wanted} do not apply to this process (import h33_bento first, or set them in "
                      "the environment)", RuntimeWarning, stacklevel=3)
    environ.update(wanted)
    return wanted
