"""The ordered change log of the live catalogue: one Redis stream per bundle lineage, applied by every worker.

A change (upsert / pause / resume / delete, ``service.live``) is acknowledged to its caller only after
``XADD`` has put it in the stream: from then on it is in the one total order that every worker and
replica applies (``XREAD`` from its own position). The stream is keyed by the bundle *lineage*: the
version of the bundle the log started on; a bundle compacted from it (``unimatch index compact``)
records the lineage and the position it folded, so a worker serving it replays only what came after.
A worker (re)started on a bundle replays the log from that bundle's position before it serves.

Durability is Redis's: an acknowledged change survives a Redis restart when Redis persists its writes
(AOF with ``appendfsync always`` for every write, ``everysec`` for all but the last second's); the
log itself is never trimmed here (compaction makes its prefix unnecessary; trimming it is the
operator's call once no replica serves an older bundle).

Sync redis-py on threads of its own: applying a change is CPU work (encoding, graph insertion), kept
off the event loop like scoring is, and off the serving threads' way: one *applier* thread per process
(``ChangeFollower.start``) applies every entry, its own worker's and the others', at the lowest OS
priority (``UNIMATCH_LIVE_APPLY_PRIORITY``, service/thread_priority.py), so that it runs on the CPU the
scoring threads leave. An acknowledging request logs its change (``XADD``), hands the change it already
parsed to the applier and waits (an event, no polling) until the applier has applied every entry up to
and including it: the answer still comes only after ``XADD`` and the apply.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from service import metrics
from service.live import ApplyResult, EntityRecord, LiveCatalogue, LiveError, position_key, stream_ms
from service.thread_priority import Priority, set_thread_priority

log = logging.getLogger("unimatch.changes")

FIELD = b"change"


def stream_key(prefix: str, lineage: str) -> str:
    return f"{prefix}changes:{lineage}"


class ChangeLog:
    """Append to and read from one Redis stream (``XADD`` / ``XRANGE`` / ``XREAD``)."""

    def __init__(self, client: Any, key: str) -> None:
        self.client = client
        self.key = key

    @classmethod
    def from_url(cls, url: str, key: str, *, timeout_s: float = 2.0) -> ChangeLog:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=timeout_s + 5.0, socket_connect_timeout=timeout_s)
        return cls(client, key)

    def append(self, change: dict[str, Any]) -> str:
        """Durably log one change; returns its position (the stream id). Raises on any Redis error."""
        pos = self.client.xadd(self.key, {FIELD: json.dumps(change, separators=(",", ":"))})
        return pos.decode() if isinstance(pos, bytes) else str(pos)

    def range_after(self, after: str, until: str = "+", count: int = 1000) -> list[tuple[str, dict[str, Any]]]:
        """Entries strictly after ``after`` up to ``until`` (inclusive), oldest first."""
        return [(p, decode_change(p, raw)) for p, raw in self.range_after_raw(after, until, count)]

    def range_after_raw(self, after: str, until: str = "+", count: int = 1000) -> list[tuple[str, bytes]]:
        """``range_after`` with each change still JSON (decoded only where it is not already known)."""
        got = self.client.xrange(self.key, min=f"({after}" if after != "0-0" else "-", max=until, count=count)
        return [self._raw(i, f) for i, f in got]

    def read(self, after: str, *, count: int = 1000, block_ms: int = 100) -> list[tuple[str, dict[str, Any]]]:
        """Wait up to ``block_ms`` for entries after ``after`` (``XREAD BLOCK``)."""
        return [(p, decode_change(p, raw)) for p, raw in self.read_raw(after, count=count, block_ms=block_ms)]

    def read_raw(self, after: str, *, count: int = 1000, block_ms: int = 100) -> list[tuple[str, bytes]]:
        """``read`` with each change still JSON."""
        got = self.client.xread({self.key: after}, count=count, block=block_ms)
        out: list[tuple[str, bytes]] = []
        for _, entries in got or []:
            out += [self._raw(i, f) for i, f in entries]
        return out

    def last_position(self) -> str:
        info = self.client.xinfo_stream(self.key) if self.client.exists(self.key) else None
        if not info:
            return "0-0"
        last = info.get("last-generated-id") or info.get(b"last-generated-id") or b"0-0"
        return last.decode() if isinstance(last, bytes) else str(last)

    def length(self) -> int:
        return int(self.client.xlen(self.key))

    @staticmethod
    def _raw(pos: Any, fields: dict[Any, Any]) -> tuple[str, bytes]:
        p = pos.decode() if isinstance(pos, bytes) else str(pos)
        raw = fields.get(FIELD) or fields.get(FIELD.decode())
        if raw is None:
            raise ValueError(f"change log entry {p} has no {FIELD.decode()!r} field")
        return p, raw if isinstance(raw, bytes) else str(raw).encode()


def decode_change(position: str, raw: bytes) -> dict[str, Any]:
    change = json.loads(raw)
    if not isinstance(change, dict):
        raise ValueError(f"change log entry {position} is not a JSON object")
    return change


@dataclass
class _Own:
    """A change this process logged and is waiting to acknowledge: applied from its parsed form."""

    change: dict[str, Any]
    records: list[EntityRecord] | None
    done: threading.Event = field(default_factory=threading.Event)
    result: ApplyResult | None = None


class ChangeFollower:
    """Applies a change log to one ``LiveCatalogue``: replay at start, then follow (the applier thread).

    ``acknowledge(change, records)`` is what an acknowledging request calls: it logs the change and
    returns once everything up to its own entry is applied in this process (by the applier thread when
    it runs, else in the caller's thread). Its own entry is applied from the change and records the
    request already holds (``check_change``), without decoding and parsing the entry again; every other
    entry is decoded from the log. Both give the same records, so the same state.
    """

    def __init__(self, changes: ChangeLog, live: LiveCatalogue, *, poll_s: float = 0.1, batch: int = 512,
                 priority: Priority = "normal", ack_timeout_s: float = 30.0) -> None:
        self.log = changes
        self.live = live
        self.poll_s = poll_s
        self.batch = batch
        self.priority = priority
        self.ack_timeout_s = ack_timeout_s
        self.priority_applied: str | None = None  # what the applier thread got (set_thread_priority)
        self.apply_cpu_s = 0.0  # the applier thread's CPU time in reads and applies (benchmarks)
        self.own_fast = 0  # own entries applied from their parsed form (tests, benchmarks)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._apply_lock = threading.Lock()  # orders the applier thread and catch-up calls
        # Own changes logged and not yet applied, by position, and own XADDs whose reply is still on its
        # way: the applier may read an entry before its request has registered it (see _own_for).
        self._cond = threading.Condition()
        self._pending: dict[str, _Own] = {}
        self._xadds = 0
        self.errors = 0
        # Results of the last entries applied, by position: an acknowledging request reports its own entry's
        # result even when another path applied it first.
        self.recent: OrderedDict[str, ApplyResult] = OrderedDict()
        self.failed: OrderedDict[str, None] = OrderedDict()  # the last entries that failed to apply
        self.lags: deque[float] = deque(maxlen=100_000)  # seconds from XADD to applied, last entries (benchmarks)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the acknowledging request --------------------------------------------------------------------
    def acknowledge(self, change: dict[str, Any], records: list[EntityRecord] | None = None) -> tuple[str, ApplyResult | None]:
        """Log ``change`` and wait until this process has applied it; (position, its result or None).

        Raises on a Redis error of the ``XADD`` (nothing logged, nothing to acknowledge). None: logged but
        not applied here (it failed to apply, or the applier did not reach it within ``ack_timeout_s``).
        """
        own = _Own(change, records)
        with self._cond:
            self._xadds += 1
        try:
            position = self.log.append(change)
        except BaseException:
            with self._cond:
                self._xadds -= 1
                self._cond.notify_all()
            raise
        with self._cond:
            self._xadds -= 1
            if position in self.recent or position in self.failed:  # settled already (the applier did not wait for us)
                own.result = self.recent.get(position)
                own.done.set()
            else:
                self._pending[position] = own
            self._cond.notify_all()
        if not own.done.is_set():
            if self.running:
                own.done.wait(self.ack_timeout_s)  # the applier sets it; a blocking wait, not a poll
            else:
                self.catch_up(position)
        with self._cond:
            self._pending.pop(position, None)
        return position, own.result if own.done.is_set() else None

    def _own_for(self, position: str) -> _Own | None:
        """This process's own change at ``position`` if it is one (waits briefly for an XADD reply in flight)."""
        with self._cond:
            deadline = time.monotonic() + 1.0
            while position not in self._pending and self._xadds > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._pending.get(position)

    def _settle(self, position: str, res: ApplyResult | None) -> None:
        with self._cond:
            if res is not None:
                self.recent[position] = res
                while len(self.recent) > 4096:
                    self.recent.popitem(last=False)
            else:
                self.failed[position] = None
                while len(self.failed) > 4096:
                    self.failed.popitem(last=False)
            own = self._pending.pop(position, None)
            if own is not None:
                own.result = res
                own.done.set()

    def _release(self, position: str) -> None:
        """A request waiting on an entry that an earlier pass settled: give it that outcome."""
        with self._cond:
            own = self._pending.pop(position, None)
            if own is not None:
                own.result = self.recent.get(position)
                own.done.set()

    # ---- applying -------------------------------------------------------------------------------------
    def _apply(self, entries: list[tuple[str, bytes]]) -> list[ApplyResult]:
        out = []
        for pos, raw in entries:
            if position_key(pos) <= position_key(self.live.position):
                self._release(pos)  # applied already (by a catch-up or the other path)
                continue
            t0 = time.perf_counter()
            own = self._own_for(pos)
            change: dict[str, Any] = {}
            try:
                if own is not None:
                    change = own.change
                    res = self.live.apply(pos, change, own.records)
                    self.own_fast += 1
                else:
                    change = decode_change(pos, raw)
                    res = self.live.apply(pos, change)
            except (LiveError, KeyError, TypeError, ValueError) as exc:
                # e.g. overlay full, or an entry someone wrote around the API: skipped here as on every other
                # worker (the same entry fails the same way everywhere), so the workers stay identical
                self.errors += 1
                log.error("change %s not applied: %s", pos, exc)
                metrics.CHANGES_APPLIED.labels(op=str(change.get("op")), outcome="failed").inc()
                with self.live.lock:
                    self.live.position = pos
                self._settle(pos, None)
                continue
            metrics.CHANGES_APPLIED.labels(op=res.op, outcome="applied").inc()
            metrics.CHANGE_APPLY_DURATION.observe(time.perf_counter() - t0)
            if stream_ms(pos):
                lag = max(0.0, time.time() - stream_ms(pos) / 1e3)
                metrics.CHANGE_LAG.observe(lag)
                self.lags.append(lag)
            out.append(res)
            self._settle(pos, res)
        metrics.set_live(self.live)
        return out

    def replay(self) -> int:
        """Apply the whole log after the catalogue's position (start-up); returns entries applied."""
        n = 0
        with self._apply_lock:
            while True:
                entries = self.log.range_after_raw(self.live.position, count=self.batch)
                if not entries:
                    return n
                n += len(self._apply(entries))

    def catch_up(self, until: str) -> ApplyResult | None:
        """Apply every entry up to and including ``until`` (an id this process just logged); its result.

        None when ``until`` was not applied here (the log lost it, or it failed to apply).
        """
        with self._apply_lock:
            while position_key(self.live.position) < position_key(until):
                entries = self.log.range_after_raw(self.live.position, until=until, count=self.batch)
                if not entries:
                    break
                self._apply(entries)
            return self.recent.get(until)

    # ---- the applier thread ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="unimatch-changes", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        self.priority_applied = self.live.applier_priority = set_thread_priority(self.priority)
        log.info("change applier for %s at priority %s", self.log.key, self.priority_applied)
        while not self._stop.is_set():
            try:
                c0 = time.thread_time()
                entries = self.log.read_raw(self.live.position, count=self.batch, block_ms=max(1, int(self.poll_s * 1e3)))
                if entries:
                    with self._apply_lock:
                        self._apply(entries)
                self.apply_cpu_s += time.thread_time() - c0
            except Exception as exc:  # Redis down: keep serving what is applied, retry
                self.errors += 1
                log.warning("change log %s: %s", self.log.key, exc)
                self._stop.wait(max(self.poll_s, 0.5))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        with self._cond:  # nobody applies them now: their requests answer "not applied here"
            for own in self._pending.values():
                own.done.set()
            self._pending.clear()
