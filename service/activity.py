"""Requests in flight in one engine, so that the live applier can wait for a moment without any.

The applier (service/changes.py) runs at the lowest OS priority, but that only keeps it off a core a
scoring thread wants; on the core next to a request it still shares the caches and the memory bus, and
on a 2-core machine that slows the request it runs beside (docs/live-catalogue.md, "Measured"). With
``UNIMATCH_LIVE_APPLY_YIELD_S`` > 0 it inserts a change's entities a few at a time and, before each
few, waits until no request is in flight (at most that long, so a saturated worker still applies). The
shadow monitor (service/shadow.py) reads the same count (``MatchEngine.active_searches``) to score only
while a CPU is free. ``MatchEngine.run`` and ``match_many``'s lockstep count once per request.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType


class Activity:
    """A counter of requests in flight (re-entrant per call: nested counts are fine) and a wait for zero."""

    def __init__(self) -> None:
        self._n = 0
        self._cond = threading.Condition(threading.Lock())
        self.waited_s = 0.0  # total time the applier waited for a quiet moment (benchmarks)

    @property
    def in_flight(self) -> int:
        return self._n

    def __enter__(self) -> Activity:
        with self._cond:
            self._n += 1
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        with self._cond:
            self._n -= 1
            if self._n == 0:
                self._cond.notify_all()

    def wait_quiet(self, max_s: float) -> bool:
        """Block until no request is in flight, at most ``max_s``; whether it got there."""
        t0 = time.perf_counter()
        with self._cond:
            ok = self._cond.wait_for(lambda: self._n == 0, timeout=max_s)
        self.waited_s += time.perf_counter() - t0
        return ok
