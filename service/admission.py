"""Admission control: shed a request at once (503 + Retry-After) when it could not finish within its deadline.

Issue 20 measured the old behaviour at ~5x saturation: a concurrency cap of 64 admitted almost every
request, the scoring pool (2 threads) queued them, and the deadline then cut the searches short:
98% of answers partial, 72% with fewer than k items. An answer cut to a few items is worse for the
caller than a quick 503 it can retry elsewhere, so this module decides *before* the work whether the
work can finish in time:

* The scoring pool is ``c`` threads. Each unit of work (one search: one /match, or one entry of a
  /match/batch) is timed in its pool thread; an exponentially weighted mean per k bucket
  (:class:`ServiceTimes`) is the expected service time of the next unit of that size.
* ``pending_s`` is the expected work of every unit submitted and not finished (queued or running).
  A new unit of expected time ``s`` finishes after about ``pending_s / c + s`` when all ``c`` threads
  are busy, after ``s`` when one is free (Little's-law style: work in flight / service rate).
* :meth:`Admission.admit` refuses a request whose estimated finish is past its deadline;
  :meth:`Admission.run` checks again when a pool thread picks the unit up (the real queue wait is then
  known, and it counts inside the deadline), and refuses it if the remaining budget is below ``s``.
  Either refusal is :class:`~service.errors.Overloaded` with a ``Retry-After`` of the estimated drain time.

The clock is injectable (``clock``), so tests drive every decision with a fake clock and fake service
times, without timing anything.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TypeVar

from service import metrics
from service.errors import Overloaded

T = TypeVar("T")
Clock = Callable[[], float]

# k buckets of the service-time estimate: a k=1000 search costs several times a k=10 one.
K_BUCKETS = (10, 100, 1000)


def k_bucket(k: int) -> int:
    """Index of the smallest bucket bound >= k (the last bucket takes everything above 1000)."""
    for i, bound in enumerate(K_BUCKETS):
        if k <= bound:
            return i
    return len(K_BUCKETS)


@dataclass
class ServiceTimes:
    """Exponentially weighted mean service time per k bucket, in seconds.

    A bucket never measured borrows the nearest larger measured bucket (an upper bound), else the
    nearest smaller one scaled up by the ratio of the buckets' k bounds (pessimistic; the warm-up seeds
    k=10 and the largest k, so in practice every bucket has a neighbour above it).
    """

    alpha: float = 0.2  # weight of the newest sample: ~5 samples of memory, adapts within a second of load
    means: list[float | None] = field(default_factory=lambda: [None] * (len(K_BUCKETS) + 1))

    def observe(self, k: int, seconds: float) -> None:
        b = k_bucket(k)
        old = self.means[b]
        self.means[b] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds

    def estimate(self, k: int) -> float | None:
        b = k_bucket(k)
        if self.means[b] is not None:
            return self.means[b]
        above = [m for m in self.means[b + 1 :] if m is not None]
        if above:  # the nearest larger bucket measured: an upper bound
            return above[0]
        below = [(i, m) for i, m in enumerate(self.means[:b]) if m is not None]
        if not below:
            return None
        i, m = below[-1]  # the nearest smaller bucket, scaled up linearly in k (pessimistic)
        bound = lambda j: K_BUCKETS[j] if j < len(K_BUCKETS) else 2 * K_BUCKETS[-1]  # noqa: E731
        return m * bound(b) / bound(i)


@dataclass
class Admission:
    """Deadline-aware admission in front of the scoring pool of ``threads`` threads (one per worker process).

    ``pending_s``/``pending`` change from the event loop (submit) and from pool threads (finish), so
    they are guarded by a lock; the decisions read them once.
    """

    threads: int
    retry_after_s: int = 1  # floor of Retry-After (seconds, an HTTP integer)
    clock: Clock = time.monotonic
    times: ServiceTimes = field(default_factory=ServiceTimes)
    pending: int = 0
    pending_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ---- estimates -------------------------------------------------------------------------------
    def wait_s(self) -> float:
        """Expected queue wait of a unit submitted now: zero while a thread is free."""
        with self._lock:
            pending, pending_s = self.pending, self.pending_s
        if pending < self.threads:
            return 0.0
        return pending_s / self.threads

    def finish_estimate(self, k: int, units: int = 1) -> float | None:
        """Seconds from now until ``units`` searches of size ``k`` submitted now would be done; None = unknown."""
        s = self.times.estimate(k)
        if s is None:
            return None
        # the first waits for the queue; the rest of a batch queue behind it, `threads` at a time
        return self.wait_s() + s * math.ceil(max(1, units) / self.threads)

    def retry_after(self) -> int:
        """Whole seconds until the work in flight has drained (at least the configured floor)."""
        return max(self.retry_after_s, math.ceil(self.wait_s()))

    def _refuse(self, reason: str, message: str) -> Overloaded:
        metrics.SHED.labels(reason=reason).inc()
        return Overloaded(message, headers={"Retry-After": str(self.retry_after())})

    # ---- decisions -------------------------------------------------------------------------------
    def admit(self, k: int, deadline: float, *, units: int = 1) -> None:
        """Raise Overloaded unless ``units`` searches of size ``k`` are expected to finish by ``deadline``.

        Only queueing sheds: while a pool thread is free the request is admitted even if its search is
        expected to outlast its budget (refusing would leave the thread idle; the answer may come back
        ``partial``), which also keeps the estimate learning after a pessimistic start. With no
        measurement yet everything is admitted; the pool-side check in :meth:`run` still applies.
        """
        if self.wait_s() == 0.0:
            return
        est = self.finish_estimate(k, units)
        if est is None:
            return
        left = deadline - self.clock()
        if est > left:
            raise self._refuse(
                "deadline",
                f"overloaded: this request would finish in ~{est * 1e3:.0f} ms, its deadline leaves "
                f"{max(0.0, left) * 1e3:.0f} ms; retry later",
            )

    async def run(self, executor: Executor, fn: Callable[[], T], *, k: int, deadline: float) -> T:
        """Run ``fn`` (one search of size ``k``) in ``executor``; refused in the thread if it starts too late.

        The unit counts as pending work from submission to completion; its run time (in the thread,
        queue wait excluded) feeds the service-time estimate.
        """
        cost = self.times.estimate(k) or 0.0
        submitted = self.clock()
        with self._lock:
            self.pending += 1
            self.pending_s += cost

        def work() -> T:
            started = self.clock()
            s = self.times.estimate(k)
            try:
                # Refused only when the wait is what broke it: it fitted when submitted, not any more.
                if s is not None and submitted + s <= deadline < started + s:
                    # Waiting for a thread ate the budget: an answer now would be cut short.
                    raise self._refuse(
                        "queue_wait",
                        f"overloaded: waited for the scoring pool until {max(0.0, deadline - started) * 1e3:.0f} ms "
                        f"were left of the deadline, less than the ~{s * 1e3:.0f} ms a search takes; retry later",
                    )
                result = fn()
                self.times.observe(k, self.clock() - started)
                return result
            finally:
                with self._lock:
                    self.pending -= 1
                    self.pending_s = max(0.0, self.pending_s - cost)

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, work)

    def seed(self, k: int, seconds: float) -> None:
        """Start the estimate from a measured warm-up search (only where nothing was measured yet)."""
        if self.times.means[k_bucket(k)] is None:
            self.times.observe(k, seconds)

    def describe(self) -> dict[str, object]:
        return {
            "threads": self.threads,
            "pending": self.pending,
            "pending_ms": round(self.pending_s * 1e3, 3),
            "service_ms_by_k": {
                (f"<={b}" if i < len(K_BUCKETS) else f">{K_BUCKETS[-1]}"): (None if m is None else round(m * 1e3, 3))
                for i, (b, m) in enumerate(zip((*K_BUCKETS, K_BUCKETS[-1]), self.times.means, strict=True))
            },
        }
