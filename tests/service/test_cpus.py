"""Thread pools are sized from the cgroup CPU quota (service/cpus.py), on fake cgroup trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import cpus
from service.config import Settings


@pytest.fixture(autouse=True)
def sixty_four_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """The node the pod landed on: 64 CPUs in the affinity mask."""
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _v2(root: Path, cpu_max: str, cgroup: str = "/") -> None:
    _write(root, "proc/self/cgroup", f"0::{cgroup}\n")
    _write(root, f"sys/fs/cgroup{cgroup.rstrip('/')}/cpu.max", cpu_max + "\n")


def test_v2_quota_of_a_two_cpu_pod(tmp_path: Path) -> None:
    _v2(tmp_path, "200000 100000")
    budget = cpus.cpu_budget(tmp_path)
    assert budget == cpus.CpuBudget(cpus=2, source="cgroup2 cpu.max", quota=2.0)


def test_v2_fractional_quota_rounds_down_but_never_to_zero(tmp_path: Path) -> None:
    _v2(tmp_path, "250000 100000")
    assert cpus.available_cpus(tmp_path) == 2
    _v2(tmp_path, "50000 100000")
    assert cpus.available_cpus(tmp_path) == 1


def test_v2_unlimited_falls_back_to_affinity(tmp_path: Path) -> None:
    _v2(tmp_path, "max 100000")
    assert cpus.cpu_budget(tmp_path) == cpus.CpuBudget(cpus=64, source="affinity", quota=None)


def test_v2_ancestor_limit_applies_to_a_nested_cgroup(tmp_path: Path) -> None:
    """Host view: the pod slice limits 3 CPUs, the container's own cgroup says max."""
    _v2(tmp_path, "max 100000", cgroup="/kubepods/pod1/ctr")
    _write(tmp_path, "sys/fs/cgroup/kubepods/pod1/cpu.max", "300000 100000\n")
    _write(tmp_path, "sys/fs/cgroup/kubepods/cpu.max", "max 100000\n")
    assert cpus.available_cpus(tmp_path) == 3


def test_v1_cfs_quota(tmp_path: Path) -> None:
    _write(tmp_path, "proc/self/cgroup", "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    _write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "400000\n")
    _write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    # hybrid hierarchy: the "0::/" line exists but /sys/fs/cgroup has no cpu.max, so v1 decides
    assert cpus.cpu_budget(tmp_path) == cpus.CpuBudget(cpus=4, source="cgroup1 cfs quota", quota=4.0)


def test_v1_unlimited_quota_is_minus_one(tmp_path: Path) -> None:
    _write(tmp_path, "proc/self/cgroup", "4:cpu,cpuacct:/\n")
    _write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
    _write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert cpus.available_cpus(tmp_path) == 64


def test_quota_above_affinity_keeps_affinity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """taskset -c 0,1 inside an 8-CPU quota: 2 threads, not 8."""
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    _v2(tmp_path, "800000 100000")
    assert cpus.cpu_budget(tmp_path) == cpus.CpuBudget(cpus=2, source="affinity", quota=8.0)


def test_no_cgroup_files_at_all(tmp_path: Path) -> None:
    assert cpus.available_cpus(tmp_path) == 64
    _write(tmp_path, "proc/self/cgroup", "garbage\n0::/\n")
    _write(tmp_path, "sys/fs/cgroup/cpu.max", "not numbers\n")
    assert cpus.available_cpus(tmp_path) == 64


def test_settings_size_the_scoring_pool_from_the_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-CPU pod on a 64-core node: 2 scoring threads, 1 each for 2 workers, not 64."""
    _v2(tmp_path, "200000 100000")
    real = cpus.available_cpus
    monkeypatch.setattr("service.config.available_cpus", lambda: real(tmp_path))
    assert Settings().effective_scoring_threads == 2
    assert Settings(workers=2).effective_scoring_threads == 1
    assert Settings(scoring_threads=4).oversubscribed
    assert not Settings().oversubscribed
