"""Admission control: shed a request at once (503 + Retry-After) when it could not finish within its deadline.

Issue 20 measured the old behaviour at ~5x saturation: a concurrency cap of 64 admitted almost every
request, the scoring pool (2 threads) queued them, and the deadline then cut the searches short:
98% of answers partial, 72% with fewer than k items. An answer cut to a few items is worse for the
caller than a quick 503 it can retry elsewhere, so this module decides *before* the work whether the
work can finish in time:

* The scoring pool is ``c`` threads. Each unit of work (one search: one /match, or one entry of a
  /match/batch) is timed in its pool thread; the last 64 times per k bucket (:class:`ServiceTimes`)
  give the expected service time of the next unit of that size (their mean) and its upper estimate
  (their 95th percentile: robust to the one search in a few dozen that a shared host deschedules).
* ``pending_s`` is the expected work of every unit submitted and not finished (queued or running).
  A new unit of expected time ``s`` finishes after about ``pending_s / c + s`` when all ``c`` threads
  are busy, after ``s`` when one is free (Little's-law style: work in flight / service rate).
* :meth:`Admission.admit` refuses a request whose estimated finish is past its deadline;
  :meth:`Admission.run` checks again when a pool thread picks the unit up (the real queue wait is
  then known, and it counts inside the deadline), and refuses it if the remaining budget is below
  ``s``. A probe per second and k bucket is let through when a thread is free, so a size refused for
  its estimate alone keeps being measured.
* The deadline counts from the request's arrival at the edge, and an answer is done when the event
  loop has resumed it: the search's own deadline is moved earlier by the usual hand-back time
  (:meth:`Admission.reserve_s`), and :meth:`Admission.edge_refuse` answers 503 before the body is
  even parsed when the loop's standing delay (CoDel's minimum sojourn over
  an interval, :meth:`Admission.observe_sojourn`) + the queue wait + a search pass the deadline: at
  several times capacity, parsing and refusing requests in the route took the event loop (and the
  GIL the searches need) a large share of the CPU.
  Every refusal is :class:`~service.errors.Overloaded` with a ``Retry-After`` of the estimated drain time.

The clock is injectable (``clock``), so tests drive every decision with a fake clock and fake service
times, without timing anything.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import threading
import time
from collections import deque
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


def runqueue_s() -> float:
    """Seconds the calling thread has spent runnable but not running (waiting for a CPU), from
    ``/proc/thread-self/schedstat`` (Linux; 0.0 elsewhere). The difference over a search says how much
    of its time the host's scheduler took away: what no admission estimate can foresee."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as fh:
            return int(fh.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def quantile(sorted_values: list[float], q: float) -> float:
    """The ``q``-quantile of an ascending list (linear interpolation, as ``numpy.percentile``)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class Window:
    """The last ``size`` samples of a duration (seconds), kept sorted as well, for means and quantiles.

    A window and not an exponentially weighted mean + 3 x deviation: on a shared host one search in
    a few dozen is descheduled for 100+ ms, and with a weight of 0.2 that single sample moved the
    upper estimate above a 100 ms deadline for the next several decisions, which then refused
    searches at ~70% load (one cause of the 503s measured there). In a window of 64
    it moves the 95th percentile not at all and the mean by 1/64 of itself.
    """

    size: int = 64
    samples: deque[float] = field(default_factory=deque)
    ordered: list[float] = field(default_factory=list)
    total: float = 0.0

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)
        bisect.insort(self.ordered, seconds)
        self.total += seconds
        if len(self.samples) > self.size:
            old = self.samples.popleft()
            del self.ordered[bisect.bisect_left(self.ordered, old)]
            self.total -= old

    def __len__(self) -> int:
        return len(self.samples)

    def mean(self) -> float:
        return max(0.0, self.total / len(self.samples))

    def quantile(self, q: float) -> float:
        return quantile(self.ordered, q)


@dataclass
class ServiceTimes:
    """Recent service times per k bucket (seconds): the mean and a high quantile of the last ``window``.

    The mean is the expected work a unit adds to the queue (work in flight is a sum of means); the
    upper estimate, the ``upper_q`` quantile (0.95), is what a unit must have left of its deadline when
    it starts after a wait, so that nearly every admitted search finishes whole. A bucket never
    measured borrows the nearest larger measured bucket (an upper bound), else the nearest smaller one
    scaled up by the ratio of the buckets' k bounds (pessimistic; the warm-up seeds k=10 and the
    largest k, so every bucket has one above it).
    """

    window: int = 64
    upper_q: float = 0.95
    windows: list[Window] = field(default_factory=list)
    seen_at: list[float] = field(default_factory=lambda: [float("-inf")] * (len(K_BUCKETS) + 1))
    # buckets whose only sample is a warm-up's (``seed``): the first real search replaces it. A warm-up
    # runs cold (first allocations, all modes): measured 290 ms for a k=10 search that then took 2 ms,
    # and as one of two samples it kept the mean above a 100 ms deadline, refusing every k=10 request.
    seeded: set[int] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if not self.windows:
            self.windows = [Window(self.window) for _ in range(len(K_BUCKETS) + 1)]

    def seed(self, k: int, seconds: float) -> None:
        """A placeholder sample for a bucket never measured: used until the first real one arrives."""
        b = k_bucket(k)
        with self._lock:
            if len(self.windows[b]):
                return
            self.windows[b].add(seconds)
            self.seeded.add(b)

    def observe(self, k: int, seconds: float, now: float | None = None) -> None:
        b = k_bucket(k)
        with self._lock:  # pool threads observe while the event loop reads
            if b in self.seeded:
                self.seeded.discard(b)
                self.windows[b] = Window(self.window)
            self.windows[b].add(seconds)
        if now is not None:
            self.seen_at[b] = now

    def measured(self, k: int) -> bool:
        return len(self.windows[k_bucket(k)]) > 0

    def estimate(self, k: int, *, upper: bool = False) -> float | None:
        """The mean service time of a search of size ``k`` (``upper``: its ``upper_q`` quantile); None = unknown."""
        b = k_bucket(k)
        n = len(self.windows)
        chosen: int | None = b if len(self.windows[b]) else None
        scale = 1.0
        if chosen is None:
            above = [i for i in range(b + 1, n) if len(self.windows[i])]
            below = [i for i in range(b) if len(self.windows[i])]
            if above:  # the nearest larger bucket measured: an upper bound
                chosen = above[0]
            elif below:  # the nearest smaller one, scaled up linearly in k (pessimistic)
                chosen = below[-1]
                bound = lambda j: K_BUCKETS[j] if j < len(K_BUCKETS) else 2 * K_BUCKETS[-1]  # noqa: E731
                scale = bound(b) / bound(chosen)
            else:
                return None
        with self._lock:
            w = self.windows[chosen]
            value = w.quantile(self.upper_q) if upper else w.mean()
        return scale * value


@dataclass
class Headroom:
    """AIMD on the share of a request's remaining budget that admission lets its planned work fill.

    The estimates above are a host's recent past; on a shared host whose CPU share changes they lag,
    and the search that was expected to fit is descheduled past its deadline and cut (``partial``).
    The answers themselves say so: this controller watches the share of partial answers among the
    last ``window`` searches and, when it exceeds ``target``, multiplies ``share`` by ``decrease``
    (admit less: the work must fit in ``share`` x what is left), at most once per ``cooldown``
    searches so one decrease can show its effect before the next. It relaxes additively in time,
    ``relax_per_s`` per second back to 1.0, so it also recovers when little is answered (TCP's AIMD,
    on admitted work instead of a window of packets). ``floor`` bounds how much it may take away.
    """

    target: float = 0.005
    window: int = 200
    # measured against 0.8 / 0.05 per s / 10 (benchmarks/overload_ab.py, two pairs at 5 x): partial
    # answers 3 of 333 against 10 of 260; a slow relax costs little at low load, where searches fit anyway
    decrease: float = 0.7
    floor: float = 0.4
    relax_per_s: float = 0.02
    cooldown: int = 5
    # the most the share may be (and where it starts): below 1.0, a margin before any feedback
    ceiling: float = 1.0
    _share: float = 1.0
    _at: float | None = None
    outcomes: deque[bool] = field(default_factory=deque)
    partials: int = 0
    since_decrease: int = 0
    decreases: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._share = min(self._share, self.ceiling)
        self.floor = min(self.floor, self.ceiling)

    def share(self, now: float) -> float:
        """The current share at time ``now`` (relaxed by the time since the last reading)."""
        with self._lock:
            return self._relax(now)

    def _relax(self, now: float) -> float:
        if self._at is not None:
            self._share = min(self.ceiling, self._share + self.relax_per_s * max(0.0, now - self._at))
        self._at = now
        return self._share

    def observe(self, partial: bool, now: float) -> None:
        """One answered search at time ``now``: cut at its deadline (``partial``) or whole."""
        with self._lock:
            self.outcomes.append(partial)
            self.partials += partial
            if len(self.outcomes) > self.window:
                self.partials -= self.outcomes.popleft()
            self.since_decrease += 1
            share = self._relax(now)
            if partial and self.partials > self.target * self.window and self.since_decrease >= self.cooldown:
                self._share = max(self.floor, share * self.decrease)
                self.since_decrease = 0
                self.decreases += 1
            metrics.HEADROOM.set(self._share)


@dataclass
class Ticket:
    """Work admission let in and the route has not submitted yet (its Redis read is in between).

    Counted in :meth:`Admission.wait_s` from the moment it is admitted: measured before this
    (2026-12-03), a unit only became pending work when it was submitted to the pool, after the
    request's feature read, so every request admitted during that read saw the same free threads and
    was let in on the same "no queue" estimate; the later ones then queued behind each other and
    were refused in the thread or answered cut short. ``units`` searches of ``cost_s`` each (the mean
    at admission); :meth:`Admission.run` takes one unit over as it submits it, :meth:`release` gives
    back what is left (idempotent: the route calls it when the request ends, however it ends).
    """

    admission: Admission
    units: int
    cost_s: float
    probe: bool = False

    def take(self) -> float:
        """One unit handed over to the pool (its cost is then counted as submitted work); 0 when none left."""
        with self.admission._lock:
            if self.units <= 0:
                return 0.0
            self.units -= 1
            self.admission.held -= 1
            self.admission.held_s = max(0.0, self.admission.held_s - self.cost_s)
            return self.cost_s

    def release(self) -> None:
        with self.admission._lock:
            if self.units <= 0:
                return
            self.admission.held -= self.units
            self.admission.held_s = max(0.0, self.admission.held_s - self.units * self.cost_s)
            self.units = 0


@dataclass
class Admission:
    """Deadline-aware admission in front of the scoring pool of ``threads`` threads (one per worker process).

    ``pending_s``/``pending`` change from the event loop (submit) and from pool threads (finish), so
    they are guarded by a lock; the decisions read them once.
    """

    threads: int
    retry_after_s: int = 1  # floor of Retry-After (seconds, an HTTP integer)
    # A search refused for its size alone (its upper estimate exceeds the whole budget) is still let
    # through once per interval when a thread is free: it keeps that bucket's estimate measured, so a
    # pessimistic estimate cannot refuse a size forever.
    probe_interval_s: float = 1.0
    clock: Clock = time.monotonic
    times: ServiceTimes = field(default_factory=ServiceTimes)
    pending: int = 0  # units submitted to the pool and not finished (queued or running)
    pending_s: float = 0.0
    held: int = 0  # units admitted and not yet submitted (:class:`Ticket`): they will queue first
    held_s: float = 0.0
    # The hand-back from a pool thread to the event loop (a searched request waits for the loop to
    # resume it) is part of the answer's time: the search's own deadline is moved earlier by this
    # quantile of the recent hand-backs, at most ``max_reserve_share`` of the request's budget.
    reserve_q: float = 0.9
    max_reserve_share: float = 0.2
    handoffs: Window = field(default_factory=Window)
    # CoDel-style standing delay of the event loop: the minimum, over each ``sojourn_interval_s``, of
    # the time requests spent between arriving at the edge and reaching admission (body read,
    # validation, waiting for the loop). A minimum, so a burst of arrivals does not count, only a
    # queue that stays; it is forgotten after two intervals without a request.
    sojourn_interval_s: float = 0.1
    # An interval with fewer requests than this gives no reading: at low load its "minimum" would be
    # one request's own delay (a large body, one collection), not a queue that stays.
    sojourn_min_samples: int = 4
    _interval_n: int = 0
    _interval_start: float = float("-inf")
    _interval_min: float = float("inf")
    _standing: float = 0.0
    _standing_at: float = float("-inf")
    _last_k: int | None = None  # k of the last request admission saw: the edge's guess for the next
    # When no request has reached admission for ``probe_interval_s``, the edge lets one through to the
    # route even though it would refuse it: the edge's inputs are only refreshed by requests that reach
    # admission, and measured, a stale estimate (the k=10 window holding one slow warm-up search)
    # refused every request for good, with the scoring threads idle.
    _route_at: float = float("-inf")
    # feedback from the answers: the share of the budget the planned work may fill (AIMD, above)
    headroom: Headroom = field(default_factory=lambda: Headroom())
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ---- estimates -------------------------------------------------------------------------------
    def wait_s(self) -> float:
        """Expected queue wait of a unit submitted now: zero while a thread is free. The work admitted
        and not yet submitted (tickets) counts: it reaches the pool before anything admitted now."""
        with self._lock:
            pending, pending_s = self.pending + self.held, self.pending_s + self.held_s
        if pending < self.threads:
            return 0.0
        return pending_s / self.threads

    def finish_estimate(self, k: int, units: int = 1) -> float | None:
        """Seconds from now until ``units`` searches of size ``k`` submitted now would be done (upper
        estimate); None = nothing measured yet."""
        s = self.times.estimate(k, upper=True)
        if s is None:
            return None
        # the first waits for the queue; the rest of a batch queue behind it, `threads` at a time
        return self.wait_s() + s * math.ceil(max(1, units) / self.threads)

    def reserve_s(self, budget_s: float) -> float:
        """Seconds of a request's deadline kept for the hand-back to the event loop (0 before any)."""
        with self._lock:
            if not len(self.handoffs):
                return 0.0
            q = self.handoffs.quantile(self.reserve_q)
        return min(q, self.max_reserve_share * budget_s)

    def observe_handoff(self, seconds: float) -> None:
        with self._lock:
            self.handoffs.add(max(0.0, seconds))

    def observe_sojourn(self, seconds: float, k: int) -> None:
        """A request reached admission ``seconds`` after it arrived at the edge (event loop thread only)."""
        now = self.clock()
        self._last_k = k
        self._route_at = now
        if now - self._interval_start >= self.sojourn_interval_s:
            if self._interval_n >= self.sojourn_min_samples:
                self._standing, self._standing_at = self._interval_min, self._interval_start + self.sojourn_interval_s
            self._interval_start, self._interval_min, self._interval_n = now, seconds, 1
        else:
            self._interval_min = min(self._interval_min, seconds)
            self._interval_n += 1

    def standing_s(self) -> float:
        """The loop's standing delay before admission (the last whole interval's minimum); 0 when stale."""
        if self.clock() - self._standing_at > 2 * self.sojourn_interval_s:
            return 0.0
        return self._standing

    def retry_after(self) -> int:
        """Whole seconds until the work in flight has drained (at least the configured floor)."""
        return max(self.retry_after_s, math.ceil(self.wait_s()))

    def _refuse(self, reason: str, message: str) -> Overloaded:
        metrics.SHED.labels(reason=reason).inc()
        return Overloaded(message, headers={"Retry-After": str(self.retry_after())})

    # ---- decisions -------------------------------------------------------------------------------
    def admit(
        self, k: int, deadline: float, *, units: int = 1, budget_s: float | None = None, whole_s: float | None = None,
    ) -> bool:
        """Raise Overloaded unless ``units`` searches of size ``k`` are expected to finish by ``deadline``.

        Returns True when the request is to run whatever its deadline: a probe (``probe_interval_s``),
        anything before the first measurement, or a request whose own budget (``budget_s``, the whole
        deadline it asked for) is below the mean search time: that deadline could never be met, which
        is the caller's choice and not overload, so it is answered (``partial``) rather than refused.
        ``whole_s`` is the request's whole budget: a probe is only for a size refused because its
        estimate exceeds all of it, never for a request refused because it lost its time waiting.
        """
        s_mean = self.times.estimate(k)
        if budget_s is not None and s_mean is not None and budget_s < s_mean:
            return True
        wait = self.wait_s()
        if wait == 0.0:
            # A thread is free: the search starts now. Refuse only when its *mean* time alone exceeds
            # what is left (the upper estimate here would refuse on a noisy measurement with nothing
            # queued, and a refused search is never measured: the estimate would stay inflated).
            est = None if s_mean is None else s_mean * math.ceil(max(1, units) / self.threads)
        else:
            est = self.finish_estimate(k, units)
        if est is None:
            return True
        now = self.clock()
        left = deadline - now
        share = self.headroom.share(now)
        # the answer is done when the loop has resumed it: the hand-back the search's own deadline
        # keeps (reserve_s) is not the search's time, so it must fit too
        reserve = self.reserve_s(whole_s if whole_s is not None else left)
        if est <= share * (left - reserve):
            return False
        b = k_bucket(k)
        # would not fit even in the plan of a request with its whole budget left: refused for its size,
        # so probed (measured: with "above the whole budget" here, a cold k=10 seed between the plan
        # and the budget was never probed and k=10 was refused for good, 0 answers in 3 s)
        for_size = whole_s is None or est > share * (whole_s - reserve)
        if wait == 0.0 and for_size and now - self.times.seen_at[b] >= self.probe_interval_s:
            self.times.seen_at[b] = now  # one probe per interval and bucket
            return True
        raise self._refuse(
            "deadline",
            f"overloaded: this request would finish in ~{est * 1e3:.0f} ms, its deadline leaves "
            f"{max(0.0, left) * 1e3:.0f} ms; retry later",
        )

    def admit_ticket(
        self, k: int, deadline: float, *, units: int = 1, budget_s: float | None = None, whole_s: float | None = None,
    ) -> Ticket:
        """:meth:`admit`, and hold the admitted work as queued from now on (a :class:`Ticket`).

        The route hands the ticket to :meth:`run` (which takes a unit over as it submits it) and
        releases it when the request ends; between the two, the requests admitted after this one see
        its work ahead of them.
        """
        probe = self.admit(k, deadline, units=units, budget_s=budget_s, whole_s=whole_s)
        cost = self.times.estimate(k) or 0.0
        n = max(1, units)
        with self._lock:
            self.held += n
            self.held_s += n * cost
        return Ticket(self, n, cost, probe)

    def edge_refuse(self, budget_s: float) -> Overloaded | None:
        """At the edge, before the body is parsed: the refusal for a request that cannot finish in time.

        A request arriving now would spend the loop's standing delay before admission, then the queue
        wait, then a search of the size the last request asked for; if that passes its whole budget,
        answering 503 here costs the event loop (and the GIL that the searches need) a fraction of
        parsing, validating and refusing it in the route. None: let it in. The standing delay alone
        can decide, with every thread idle: measured, a loop saturated by refusing requests in the
        route kept them ~0.6 s before admission while the pool had nothing to do. The search is
        estimated as the route does: its mean with a thread free, its upper estimate behind a queue
        (measured with the mean alone, 2026-12-03: at 5 x the edge refused 304 requests and the route,
        after parsing each one, 4,108: the loop's time the admitted searches then waited for).
        """
        if self._last_k is None:
            return None
        wait = self.wait_s()
        s = self.times.estimate(self._last_k, upper=wait > 0.0)
        if s is None:
            return None
        est = self.standing_s() + wait + s
        now = self.clock()
        if est <= self.headroom.share(now) * (budget_s - self.reserve_s(budget_s)):
            return None
        if now - self._route_at >= self.probe_interval_s:
            self._route_at = now  # the route decides this one (one per interval), and refreshes the estimates
            return None
        return self._refuse(
            "edge", f"overloaded: a request now would finish in ~{est * 1e3:.0f} ms, past its {budget_s * 1e3:.0f} ms "
            "deadline; retry later",
        )

    async def run(
        self, executor: Executor, fn: Callable[[], T], *, k: int, deadline: float, probe: bool = False,
        timing: dict[str, float] | None = None, ticket: Ticket | None = None,
    ) -> T:
        """Run ``fn`` (one search of size ``k``) in ``executor``; refused in the thread if it starts too late.

        The unit counts as pending work from submission to completion (or to its cancellation before a
        thread took it); its run time (in the thread, queue wait excluded) feeds the service-time
        estimate. When a thread picks it up the real wait is known: a unit (not a probe) with less of
        its deadline left than a search takes (over the headroom's share) is refused then, instead of
        being answered cut short; as in :meth:`admit`, a search that queued must have its upper
        estimate left, one that found a thread free its mean (measured: the upper estimate for every
        search refused most of what the route had just admitted on the mean, at 5 x, and the partial
        answers were the queued ones anyway). A size with no search finished for ``probe_interval_s``
        runs anyway, so a refusal here can never freeze its estimate. ``ticket``: the unit was held
        since admission (:meth:`admit_ticket`); it moves from held to submitted work here.
        """
        cost = self.times.estimate(k) or 0.0
        if timing is not None:
            timing["submitted"] = self.clock()
        if ticket is not None:
            ticket.take()
        with self._lock:
            queued = self.pending >= self.threads
            self.pending += 1
            self.pending_s += cost
        done = False

        def release() -> None:
            nonlocal done
            with self._lock:
                if done:
                    return
                done = True
                self.pending -= 1
                self.pending_s = max(0.0, self.pending_s - cost)

        def work() -> T:
            started = self.clock()
            if timing is not None:
                timing["started"] = started
            s = self.times.estimate(k, upper=queued)
            try:
                if not probe and s is not None and s > self.headroom.share(started) * (deadline - started):
                    b = k_bucket(k)
                    if started - self.times.seen_at[b] < self.probe_interval_s:
                        raise self._refuse(
                            "queue_wait",
                            f"overloaded: {max(0.0, deadline - started) * 1e3:.0f} ms of the deadline were left when "
                            f"a scoring thread was free, less than the ~{s * 1e3:.0f} ms a search may take; retry later",
                        )
                    self.times.seen_at[b] = started  # a probe: one per interval and bucket
                    if timing is not None:
                        timing["probe"] = 1.0
                waited = runqueue_s() if timing is not None else 0.0
                result = fn()
                end = self.clock()
                if timing is not None:
                    timing["ended"] = end
                    timing["runqueue"] = runqueue_s() - waited
                self.times.observe(k, end - started, now=end)
                return result
            finally:
                release()

        future = executor.submit(work)
        # cancelled before a thread took it (its request went away): work() never runs, so release here
        future.add_done_callback(lambda f: release() if f.cancelled() else None)
        return await asyncio.wrap_future(future)

    def observe_outcome(self, partial: bool) -> None:
        """An answered search (not a probe, not a caller's own short deadline): feeds the headroom."""
        self.headroom.observe(partial, self.clock())

    def seed(self, k: int, seconds: float) -> None:
        """Start the estimate from a measured warm-up search (only where nothing was measured yet)."""
        self.times.seed(k, seconds)

    def describe(self) -> dict[str, object]:
        names = [f"<={b}" for b in K_BUCKETS] + [f">{K_BUCKETS[-1]}"]
        bounds = [*K_BUCKETS, K_BUCKETS[-1] + 1]
        by_k: dict[str, float | None] = {}
        upper_by_k: dict[str, float | None] = {}
        for name, k in zip(names, bounds, strict=True):
            measured = self.times.measured(k)
            mean, upper = self.times.estimate(k), self.times.estimate(k, upper=True)
            by_k[name] = round(mean * 1e3, 3) if measured and mean is not None else None
            upper_by_k[name] = round(upper * 1e3, 3) if measured and upper is not None else None
        return {
            "threads": self.threads,
            "pending": self.pending,
            "pending_ms": round(self.pending_s * 1e3, 3),
            "held": self.held,
            "held_ms": round(self.held_s * 1e3, 3),
            "service_ms_by_k": by_k,
            f"service_ms_p{self.times.upper_q * 100:g}_by_k": upper_by_k,
            "standing_delay_ms": round(self.standing_s() * 1e3, 3),
            "handoff_reserve_ms": round(self.reserve_s(float("inf")) * 1e3, 3),
            "headroom_share": round(self.headroom.share(self.clock()), 3),
            "headroom_decreases": self.headroom.decreases,
        }
