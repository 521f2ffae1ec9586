"""How many CPUs the builtin engine may use: the ones the kernel lets this process run on, within its CPU limit.

`os.cpu_count()` is the node's count: in a pod on a 64-core node it says 64 whatever the pod was given, and torch
with 64 threads on a 4-CPU allotment has many more threads than CPUs to run them. The
affinity mask is what a cpuset (the kubelet's static CPU manager, `taskset`) allows; a CPU limit is a CFS quota in
the pod's cgroup. The operator also passes the replica's CPU request as `--torch-threads` (see `workloads.py`),
which covers a pod with a request and no limit.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cgroup_cpu_limit(cpu_max: str | None = None, cfs_quota_us: str | None = None,
                     cfs_period_us: str | None = None) -> float | None:
    """CPUs a cgroup's quota allows, from cgroup v2's `cpu.max` ("200000 100000", or "max 100000" for none) or v1's
    `cpu.cfs_quota_us` (-1 for none) and `cpu.cfs_period_us`; None when there is no limit or the text is unreadable."""
    try:
        if cpu_max is not None:
            quota, _, period = cpu_max.strip().partition(" ")
            if quota == "max":
                return None
            return int(quota) / int(period or "100000")
        if cfs_quota_us is not None and cfs_period_us is not None:
            quota_us = int(cfs_quota_us.strip())
            return None if quota_us <= 0 else quota_us / int(cfs_period_us.strip())
    except (ValueError, ZeroDivisionError):
        return None
    return None


def usable_cpus(affinity: int, limit: float | None) -> int:
    """Whole CPUs to use: the affinity mask's count, capped by a quota rounded up (1.5 CPUs of quota keep two
    threads busy part of the time rather than one all of it), never less than one."""
    count = affinity if limit is None else min(affinity, math.ceil(limit))
    return max(count, 1)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def available_cpus() -> int:
    """`usable_cpus` for this process, read from the kernel."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count() or 1
    limit = cgroup_cpu_limit(_read(CGROUP_V2_CPU_MAX), _read(CGROUP_V1_QUOTA), _read(CGROUP_V1_PERIOD))
    return usable_cpus(affinity, limit)
