"""The chaos suite's statistics of the overload bursts (loadtests/chaos.py): pure functions, no service."""

from __future__ import annotations

import pytest


def test_the_wilson_interval_of_a_complete_share() -> None:
    """Known values (Wilson score interval, z = 1.96): it stays inside [0, 1] and is wide at small n."""
    from loadtests.chaos import wilson

    lo, hi = wilson(117, 120)  # the first burst of 2026-12-03's final run: 97.5%
    assert lo == pytest.approx(0.9290, abs=2e-4) and hi == pytest.approx(0.9915, abs=2e-4)
    lo, hi = wilson(1000, 1000)
    assert lo == pytest.approx(0.99617, abs=1e-4) and hi == 1.0
    assert wilson(0, 0) == (0.0, 1.0)


def test_the_overload_bursts_are_pooled_into_one_line() -> None:
    from loadtests.chaos import Answer, Phase, Row, pooled_overload

    def burst(whole: int, cut: int) -> Phase:
        return Phase([Answer(0.0, 200, 0.05, server_s=0.05) for _ in range(whole)]
                     + [Answer(0.0, 200, 0.09, partial=True, server_s=0.09) for _ in range(cut)]
                     + [Answer(0.0, 503, 0.001)])

    rows = [Row("baseline", "-", "none", burst(10, 0), "-"),
            Row("overload-5x (run 1)", "-", "5x", burst(99, 1), "-"),
            Row("overload-5x (run 2)", "-", "5x", burst(97, 3), "-")]
    line = pooled_overload(rows)
    assert line is not None and "the 2 bursts pooled: 196 of 200 answers complete = 98.00%" in line
    assert "95% Wilson interval 94.97%-99.22%" in line and "2 answered 503; 0 failed" in line
    assert pooled_overload(rows[:2]) is None  # one burst: its row says it already
