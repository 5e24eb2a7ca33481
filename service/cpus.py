"""How many CPUs this process may really use: the cgroup CPU quota, not the node's core count.

A pod with ``limits.cpu: 2`` on a 64-core node sees 64 CPUs in ``sched_getaffinity`` (unless the
kubelet's static CPU manager pins it), but the kernel's CFS bandwidth control lets it run only
2 CPU-seconds per second: a pool of 64 scoring threads is throttled in bursts and its p99 explodes.
So every pool the service sizes starts from :func:`available_cpus`, the smallest of

* the affinity mask (``os.sched_getaffinity``, taskset / cpusets),
* the cgroup v2 ``cpu.max`` quota of this process's cgroup and of every ancestor up to the root,
* the cgroup v1 CFS quota (``cpu.cfs_quota_us / cpu.cfs_period_us``) of the ``cpu`` controller,

rounded down (a 2.5-CPU quota gives 2 threads: a third thread would be throttled for part of each
period) and never below 1. Paths are relative to a ``root`` argument so tests use fake trees.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs this process may use and where the limit comes from."""

    cpus: int
    source: str  # "affinity", "cgroup2 cpu.max", "cgroup1 cfs quota"
    quota: float | None  # the quota in CPUs (fractional) when a cgroup limits us, else None


def _affinity() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_paths(root: Path) -> tuple[str | None, str | None]:
    """This process's cgroup v2 path and cgroup v1 ``cpu`` controller path, from /proc/self/cgroup."""
    text = _read(root / "proc/self/cgroup") or ""
    v2 = v1 = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(base: Path, cgroup: str) -> list[Path]:
    """``base/cgroup``, its parents up to ``base``; inside a container's cgroup namespace the path is
    "/" and only ``base`` exists. Missing directories are skipped (host path not mounted here)."""
    rel = [p for p in cgroup.strip("/").split("/") if p]
    out = [base.joinpath(*rel[:n]) for n in range(len(rel), 0, -1)]
    out.append(base)
    return [p for p in out if p.is_dir()]


def _v2_quota(root: Path, cgroup: str) -> float | None:
    """Smallest ``cpu.max`` quota (in CPUs) along the cgroup's ancestry; None when all are "max"."""
    best: float | None = None
    for directory in _ancestors(root / "sys/fs/cgroup", cgroup):
        text = _read(directory / "cpu.max")
        if not text:
            continue
        fields = text.split()
        if fields[0] == "max":
            continue
        try:
            quota, period = int(fields[0]), int(fields[1]) if len(fields) > 1 else 100_000
        except ValueError:
            continue
        if quota > 0 and period > 0:
            cpus = quota / period
            best = cpus if best is None else min(best, cpus)
    return best


def _v1_quota(root: Path, cgroup: str) -> float | None:
    """CFS quota (in CPUs) of the v1 ``cpu`` controller; ``cfs_quota_us = -1`` means unlimited."""
    best: float | None = None
    for mount in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
        base = root / "sys/fs/cgroup" / mount
        if not base.is_dir():
            continue
        for directory in _ancestors(base, cgroup):
            quota_text = _read(directory / "cpu.cfs_quota_us")
            period_text = _read(directory / "cpu.cfs_period_us")
            try:
                quota, period = int(quota_text or "-1"), int(period_text or "0")
            except ValueError:
                continue
            if quota > 0 and period > 0:
                cpus = quota / period
                best = cpus if best is None else min(best, cpus)
        break  # the first mount that exists is the controller's
    return best


def cpu_budget(root: Path = Path("/")) -> CpuBudget:
    """The CPUs available to this process (see the module docstring), with the limit's source."""
    affinity = _affinity()
    v2_path, v1_path = _cgroup_paths(root)
    quota: float | None = None
    source = "affinity"
    if v2_path is not None:
        quota = _v2_quota(root, v2_path)
        source = "cgroup2 cpu.max"
    if quota is None and v1_path is not None:
        quota = _v1_quota(root, v1_path)
        source = "cgroup1 cfs quota"
    if quota is None:
        return CpuBudget(cpus=affinity, source="affinity", quota=None)
    limited = max(1, math.floor(quota + 1e-9))
    if limited >= affinity:
        return CpuBudget(cpus=affinity, source="affinity", quota=quota)
    return CpuBudget(cpus=limited, source=source, quota=quota)


def available_cpus(root: Path = Path("/")) -> int:
    """``cpu_budget(root).cpus``: what thread pools should be sized from."""
    return cpu_budget(root).cpus
