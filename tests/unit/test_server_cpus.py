"""How many CPU threads the builtin engine gives torch: the process's own CPUs, not the node's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from deepseek_server.engine.cpus import cgroup_cpu_limit, usable_cpus


@pytest.mark.parametrize(("cpu_max", "expected"), [
    ("max 100000\n", None),          # cgroup v2, no limit
    ("200000 100000\n", 2.0),        # a limit of 2 CPUs
    ("150000 100000\n", 1.5),
    ("50000 100000\n", 0.5),         # 500m
    ("400000\n", 4.0),               # period left out: the kernel's default 100 ms
    ("garbage\n", None),
    ("100000 0\n", None),
])
def test_cgroup_v2_cpu_max_is_read_as_cpus(cpu_max: str, expected: float | None) -> None:
    assert cgroup_cpu_limit(cpu_max=cpu_max) == expected


@pytest.mark.parametrize(("quota", "period", "expected"), [
    ("-1\n", "100000\n", None),      # cgroup v1, no limit
    ("300000\n", "100000\n", 3.0),
    ("25000\n", "50000\n", 0.5),
    ("x\n", "100000\n", None),
])
def test_cgroup_v1_quota_is_read_as_cpus(quota: str, period: str, expected: float | None) -> None:
    assert cgroup_cpu_limit(cfs_quota_us=quota, cfs_period_us=period) == expected


def test_no_cgroup_files_means_no_limit() -> None:
    assert cgroup_cpu_limit() is None
    assert cgroup_cpu_limit(cfs_quota_us="100000") is None  # a quota without its period says nothing


@pytest.mark.parametrize(("affinity", "limit", "expected"), [
    (64, None, 64),     # a whole node, no limit
    (64, 4.0, 4),       # a pod limited to 4 CPUs on a 64-core node
    (64, 1.5, 2),       # a fractional quota keeps the next whole thread busy part of the time
    (64, 0.1, 1),       # 100m still gets a thread
    (2, 8.0, 2),        # a cpuset narrower than the quota wins
    (0, None, 1),
])
def test_usable_cpus_is_the_affinity_within_the_quota(affinity: int, limit: float | None, expected: int) -> None:
    assert usable_cpus(affinity, limit) == expected


def threads_when_pinned(cpus: int) -> list[str]:
    """cpu_threads(None) and cpu_threads(3) in a process allowed on its first `cpus` CPUs."""
    code = (f"import os; os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:{cpus}]); "
            "from deepseek_server.engine.loading import cpu_threads; print(cpu_threads(None), cpu_threads(3))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_without_a_declared_count_torch_leaves_one_of_the_processes_cpus_free() -> None:
    """A cpuset (what the kubelet's static CPU manager or taskset gives) counts, not the node: one thread on one CPU,
    one on two; an explicit --torch-threads is taken as given."""
    assert threads_when_pinned(1) == ["1", "3"]
    if len(os.sched_getaffinity(0)) >= 3:
        assert threads_when_pinned(3) == ["2", "3"]
    if len(os.sched_getaffinity(0)) >= 2:
        assert threads_when_pinned(2) == ["1", "3"]
