"""Live search-quality monitor: a sampled share of requests re-scored exhaustively, off the request path.

The calibration (``contracts.calibration``) says how much of the model's own top-k the search finds on
held-out users when the bundle was built. Live traffic can drift from that (other users, other
domains' mix, a catalogue that changed), so a share ``rate`` of answered graph-mode requests is queued
here and a single low-priority thread scores the same (user, domain, k, filters) exhaustively and
records coverage@k = |served top-k ∩ exhaustive top-k| / |exhaustive top-k| per domain and k bucket
(``unimatch_search_shadow_coverage``) beside the calibrated figure
(``unimatch_search_calibrated_coverage``): the alert compares the two.

Never on the request path: ``offer`` is a random draw and a ``put_nowait`` on a bounded queue (a full
queue drops the sample and counts it); the worker runs at the lowest scheduling priority and sleeps
after each job so that it uses at most ``cpu_share`` of one core. And it yields: the scan is scored in
small calls (``MatchEngine.background_chunk``), and before each one it waits until a CPU is free of
requests *and* ``spare_cpus`` more are (``MatchEngine.active_searches``), so that a request arriving
during the call finds a free CPU rather than the one the scan holds. An OS priority alone did not keep it
out of the way: at rate 0.01 and 70% load its scans raised the requests' p99 by ~20-25% (amazon,
docs/search-benchmark.md, sixth session), as a request arriving while the scan held a core waited for
the scheduler; waiting for one free CPU still measured 1.23x and 1.45x in paired windows (seventh session),
hence the spare CPU and ``SCHED_IDLE``. A job that finds no such moment for ``max_wait_s`` in all is
dropped (counted).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from service import metrics
from service.thread_priority import set_thread_priority

if TYPE_CHECKING:
    from contracts.features import UserFeatures
    from service.engine import MatchEngine, MatchResult

log = logging.getLogger("unimatch.shadow")

# k buckets of the metric's label (a request's k is reported under the smallest bucket >= k).
K_BUCKETS: tuple[int, ...] = (10, 50, 200, 1000, 10_000)


def k_bucket(k: int) -> str:
    for b in K_BUCKETS:
        if k <= b:
            return str(b)
    return "inf"


@dataclass(frozen=True)
class ShadowJob:
    engine: MatchEngine
    domain: int
    domain_name: str
    k: int
    user: UserFeatures
    served_rows: np.ndarray
    exclude_rows: np.ndarray | None
    entity_types: list[int] | None


def coverage(served: np.ndarray, exact: np.ndarray) -> float:
    """|served ∩ exact| / |exact|: the share of the exhaustive top-k that the served answer holds."""
    if exact.size == 0:
        return 1.0
    return float(np.intersect1d(served, exact).size / exact.size)


class _Starved(Exception):
    """No CPU was free for the monitor's scan within max_wait_s: the job is dropped."""


class ShadowMonitor:
    """Bounded queue + one worker thread; ``offer`` from any thread, ``close`` at shutdown."""

    def __init__(self, *, rate: float, queue_size: int = 8, cpu_share: float = 0.1, seed: int | None = None,
                 sleep: Callable[[float], None] = time.sleep, start: bool = True, cpus: int | None = None,
                 max_wait_s: float = 10.0, poll_s: float = 0.001, yield_to_requests: bool = True,
                 spare_cpus: int = 1) -> None:
        from service.cpus import cpu_budget

        self.rate = float(rate)
        self.cpu_share = float(cpu_share)
        self.cpus = int(cpus) if cpus is not None else cpu_budget().cpus  # what the request threads run on
        # A chunk is scored only while at least 1 + spare_cpus CPUs serve no request: one for the chunk,
        # the spare ones for requests that arrive during it, so that they find a CPU free instead of one
        # the scan holds (0 = the sixth session's rule, any free CPU; on 2 CPUs, 1 = no request in flight).
        if spare_cpus < 0:
            raise ValueError(f"spare_cpus must be >= 0, got {spare_cpus}")
        self.spare_cpus = int(spare_cpus)
        self.busy_limit = max(self.cpus - 1 - self.spare_cpus, 0)  # most requests in flight a chunk starts beside
        self.priority_applied: str | None = None  # the OS priority the worker got (service.thread_priority)
        self.max_wait_s, self.poll_s = float(max_wait_s), float(poll_s)
        self.starved = 0  # jobs dropped because no CPU was free for max_wait_s
        # False: the scan runs like a request (large calls, no waiting), as before the sixth session; kept
        # so that the benchmark measures both side by side (UNIMATCH_SHADOW_YIELD=false).
        self.yield_to_requests = bool(yield_to_requests)
        self._queue: queue.Queue[ShadowJob | None] = queue.Queue(maxsize=queue_size)
        self._rng = random.Random(seed)
        self._sleep = sleep
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.done = 0
        if start and self.rate > 0:
            self._thread = threading.Thread(target=self._run, name="unimatch-shadow", daemon=True)
            self._thread.start()

    # ---- request side: O(1), never blocks ------------------------------------------------------------
    def offer(self, engine: MatchEngine, domain: int, k: int, user: UserFeatures, result: MatchResult, *,
              exclude_rows: np.ndarray | None = None, entity_types: list[int] | None = None) -> bool:
        """Maybe queue this answered request for re-scoring; True when queued."""
        if self.rate <= 0 or result.mode != "graph" or result.partial or self._rng.random() >= self.rate:
            return False
        job = ShadowJob(engine=engine, domain=domain, domain_name=engine.bundle.schema.domains[domain], k=k,
                        user=user, served_rows=np.asarray(result.rows, dtype=np.int64), exclude_rows=exclude_rows,
                        entity_types=entity_types)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.dropped += 1
            metrics.SHADOW_DROPPED.inc()
            return False
        return True

    # ---- worker side ---------------------------------------------------------------------------------
    def run_job(self, job: ShadowJob) -> float | None:
        """Re-score one request exhaustively and record its coverage; returns the coverage, or None when
        the job was dropped for want of a free CPU."""
        engine = job.engine
        q = engine.query(job.user, job.domain, job.k, exclude_rows=job.exclude_rows, entity_types=job.entity_types)
        try:
            exact = engine.run(q, mode="exhaustive",
                               between_chunks=self._yield_to_requests(engine) if self.yield_to_requests else None)
        except _Starved:
            self.starved += 1
            self.dropped += 1
            metrics.SHADOW_DROPPED.inc()
            return None
        cov = coverage(job.served_rows, np.asarray(exact.rows, dtype=np.int64))
        bucket = k_bucket(job.k)
        metrics.SHADOW_COVERAGE.labels(domain=job.domain_name, k_bucket=bucket).observe(cov)
        point = job.engine.calibrated_point(job.domain, job.k)
        if point is not None and point.mode == "graph":
            metrics.CALIBRATED_COVERAGE.labels(domain=job.domain_name, k_bucket=bucket).set(point.coverage)
        self.done += 1
        return cov

    def _yield_to_requests(self, engine: MatchEngine) -> Callable[[], None]:
        """The scan's between-calls hook: wait while fewer than 1 + spare_cpus CPUs are free of requests;
        give up after max_wait_s."""
        waited = [0.0]

        def wait_for_a_free_cpu() -> None:
            while engine.active_searches > self.busy_limit:
                if waited[0] >= self.max_wait_s or self._stop.is_set():
                    raise _Starved
                self._sleep(self.poll_s)
                waited[0] += self.poll_s

        return wait_for_a_free_cpu

    def _run(self) -> None:
        # SCHED_IDLE (else nice 19): a request thread that wakes on this CPU preempts the scan at once;
        # under nice 19 alone it could wait for the scan's time slice. Only this thread is changed.
        self.priority_applied = set_thread_priority("idle")
        while not self._stop.is_set():
            job = self._queue.get()
            if job is None:
                break
            t0 = time.perf_counter()
            try:
                self.run_job(job)
            except Exception as exc:  # a monitor failure must never reach a request; say it and go on
                log.warning("shadow re-scoring failed: %s", exc)
            spent = time.perf_counter() - t0
            # Duty cycle <= cpu_share: work t, then rest t * (1/share - 1).
            self._sleep(spent * (1.0 / self.cpu_share - 1.0))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass
            self._thread.join(timeout=5)
