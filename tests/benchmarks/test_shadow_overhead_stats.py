"""The shadow benchmark's paired estimate (benchmarks/shadow_overhead.py): groups of adjacent windows."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.shadow_overhead import OFF, ON, _arm_order, _paired_ratio


def _windows(p99: list[tuple[float, float]]) -> list[dict[str, object]]:
    """Windows in the benchmark's ABBA order with the given (off, on) p99 per group."""
    order = _arm_order([OFF, ON], 2 * len(p99))
    return [{"group": w // 2, "arm": arm, "p99_ms": p99[w // 2][0 if arm == OFF else 1]} for w, arm in enumerate(order)]


def test_every_group_holds_one_window_per_arm() -> None:
    for arms in ([OFF, ON], [OFF, ON, "on, no yield"]):
        order = _arm_order(arms, 6 * len(arms))
        for g in range(6):
            assert sorted(order[g * len(arms):(g + 1) * len(arms)]) == sorted(arms)


def test_paired_ratio_measures_the_within_group_ratio() -> None:
    rng = np.random.default_rng(0)
    same = _paired_ratio(_windows([(50.0, 50.0)] * 8), ON, rng)
    assert same is not None and same["geomean"] == pytest.approx(1.0) and same["ci95"] == pytest.approx([1.0, 1.0])
    assert same["above_one"] == 0
    # the machine drifts 3x over the run; the monitor adds 10% in every group: the paired ratio sees 1.1
    drift = [(40.0 * (1 + g / 3), 44.0 * (1 + g / 3)) for g in range(10)]
    r = _paired_ratio(_windows(drift), ON, rng)
    assert r is not None and r["geomean"] == pytest.approx(1.1) and r["median"] == pytest.approx(1.1)
    assert r["above_one"] == 10 and r["ci95"][0] == pytest.approx(1.1)


def test_one_stalled_window_moves_one_group_only() -> None:
    groups = [(50.0, 50.0)] * 9 + [(4000.0, 50.0)]  # a host stall in one off window
    r = _paired_ratio(_windows(groups), ON, np.random.default_rng(0))
    assert r is not None
    assert r["median"] == pytest.approx(1.0)
    assert r["geomean"] == pytest.approx((50.0 / 4000.0) ** 0.1)  # the stalled group's share, 1/10 in logs
    assert r["ci95"][0] < r["geomean"] < r["ci95"][1] <= 1.0
