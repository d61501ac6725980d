"""OpenMP defaults set by ``import h33_bento``: passive waiting, and threads for the CPUs the process
may really use (affinity mask, cgroup v1/v2 quota), unless the user set them.

The cgroup files are fakes under tmp_path (the real ones describe whatever machine runs the
tests); the defaults themselves are checked in fresh interpreters, through OpenMP itself.
"""
from __future__ import annotations

import os
import subprocess
import sys

from h33_bento._omp import cgroup_cpu_limit, cpu_budget


def cgroup(tmp_path, proc_line: str, files: dict[str, str]):
    root = tmp_path / "sys-fs-cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(proc_line)
    return root, proc


def test_cgroup_v2_quota_inside_a_container(tmp_path):
    root, proc = cgroup(tmp_path, "0::/\n", {"cpu.max": "150000 100000\n"})
    assert cgroup_cpu_limit(root, proc) == 1.5
    assert cpu_budget(affinity=64, quota=1.5) == 1  # a second thread would be throttled half the time


def test_cgroup_v2_the_tightest_ancestor_wins(tmp_path):
    root, proc = cgroup(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "kubepods/cpu.max": "max 100000", "kubepods/pod1/cpu.max": "200000 100000",
        "kubepods/pod1/ctr/cpu.max": "max 100000"})
    assert cgroup_cpu_limit(root, proc) == 2.0
    assert cpu_budget(affinity=64, quota=2.0) == 2


def test_cgroup_v2_without_a_quota(tmp_path):
    root, proc = cgroup(tmp_path, "0::/\n", {"cpu.max": "max 100000"})
    assert cgroup_cpu_limit(root, proc) is None
    assert cpu_budget(affinity=3, quota=None) == 3


def test_cgroup_v1_quota(tmp_path):
    root, proc = cgroup(tmp_path, "11:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n", {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_limit(root, proc) == 3.0
    root, proc = cgroup(tmp_path / "unlimited", "4:cpu,cpuacct:/\n", {
        "cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_limit(root, proc) is None


def test_no_cgroup_files_and_tiny_quotas(tmp_path):
    assert cgroup_cpu_limit(tmp_path / "none", tmp_path / "missing") is None
    assert cpu_budget(affinity=4, quota=0.5) == 1
    assert cpu_budget(affinity=2, quota=8.0) == 2  # the affinity mask is the other bound


PROBE = """
import ctypes, os, warnings
warnings.simplefilter("always")
{first}
import h33_bento, openfhe
gomp = next(l.split()[-1] for l in open("/proc/self/maps") if "libgomp" in l)
print(os.environ.get("OMP_WAIT_POLICY"), os.environ.get("OMP_NUM_THREADS"), ctypes.CDLL(gomp).omp_get_max_threads())
"""


def probe(env: dict[str, str], first: str = "") -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    return subprocess.run([sys.executable, "-c", PROBE.format(first=first)], env={**clean, **env},
                          capture_output=True, text=True, timeout=120, check=True)


def test_import_sets_safe_defaults_that_openmp_uses():
    out = probe({}).stdout.split()
    threads = cpu_budget(quota=cgroup_cpu_limit())
    assert out == ["PASSIVE", str(threads), str(threads)]


def test_user_settings_are_kept():
    assert probe({"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3"}).stdout.split() == ["ACTIVE", "3", "3"]


def test_importing_openfhe_first_warns_that_it_is_too_late():
    done = probe({}, first="import openfhe")
    assert "imported after openfhe" in done.stderr and "OMP_NUM_THREADS" in done.stderr
