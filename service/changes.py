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
off the event loop like scoring is.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Any

from service import metrics
from service.live import ApplyResult, LiveCatalogue, LiveError, position_key, stream_ms

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
        got = self.client.xrange(self.key, min=f"({after}" if after != "0-0" else "-", max=until, count=count)
        return [self._decode(i, f) for i, f in got]

    def read(self, after: str, *, count: int = 1000, block_ms: int = 100) -> list[tuple[str, dict[str, Any]]]:
        """Wait up to ``block_ms`` for entries after ``after`` (``XREAD BLOCK``)."""
        got = self.client.xread({self.key: after}, count=count, block=block_ms)
        out: list[tuple[str, dict[str, Any]]] = []
        for _, entries in got or []:
            out += [self._decode(i, f) for i, f in entries]
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
    def _decode(pos: Any, fields: dict[Any, Any]) -> tuple[str, dict[str, Any]]:
        p = pos.decode() if isinstance(pos, bytes) else str(pos)
        raw = fields.get(FIELD) or fields.get(FIELD.decode())
        if raw is None:
            raise ValueError(f"change log entry {p} has no {FIELD.decode()!r} field")
        return p, json.loads(raw)


class ChangeFollower:
    """Applies a change log to one ``LiveCatalogue``: replay at start, then follow (thread), or catch up now.

    ``catch_up(until)`` is what an acknowledging request calls: everything up to its own entry is applied
    in this process before it answers. The follower thread applies what other workers logged within
    about ``poll_s`` of its ``XADD``.
    """

    def __init__(self, changes: ChangeLog, live: LiveCatalogue, *, poll_s: float = 0.1, batch: int = 512) -> None:
        self.log = changes
        self.live = live
        self.poll_s = poll_s
        self.batch = batch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._apply_lock = threading.Lock()  # orders the follower thread and catch-up calls
        self.errors = 0
        # Results of the last entries applied, by position: an acknowledging request reports its own entry's
        # result even when the follower thread applied it first.
        self.recent: OrderedDict[str, ApplyResult] = OrderedDict()
        self.lags: deque[float] = deque(maxlen=100_000)  # seconds from XADD to applied, last entries (benchmarks)

    def _apply(self, entries: list[tuple[str, dict[str, Any]]]) -> list[ApplyResult]:
        out = []
        for pos, change in entries:
            if position_key(pos) <= position_key(self.live.position):
                continue  # applied already (by a catch-up or the other path)
            t0 = time.perf_counter()
            try:
                res = self.live.apply(pos, change)
            except (LiveError, KeyError, TypeError, ValueError) as exc:
                # e.g. overlay full, or an entry someone wrote around the API: skipped here as on every other
                # worker (the same entry fails the same way everywhere), so the workers stay identical
                self.errors += 1
                log.error("change %s not applied: %s", pos, exc)
                metrics.CHANGES_APPLIED.labels(op=str(change.get("op")), outcome="failed").inc()
                with self.live.lock:
                    self.live.position = pos
                continue
            metrics.CHANGES_APPLIED.labels(op=res.op, outcome="applied").inc()
            metrics.CHANGE_APPLY_DURATION.observe(time.perf_counter() - t0)
            if stream_ms(pos):
                lag = max(0.0, time.time() - stream_ms(pos) / 1e3)
                metrics.CHANGE_LAG.observe(lag)
                self.lags.append(lag)
            out.append(res)
            self.recent[pos] = res
            while len(self.recent) > 4096:
                self.recent.popitem(last=False)
        metrics.set_live(self.live)
        return out

    def replay(self) -> int:
        """Apply the whole log after the catalogue's position (start-up); returns entries applied."""
        n = 0
        with self._apply_lock:
            while True:
                entries = self.log.range_after(self.live.position, count=self.batch)
                if not entries:
                    return n
                n += len(self._apply(entries))

    def catch_up(self, until: str) -> ApplyResult | None:
        """Apply every entry up to and including ``until`` (an id this process just logged); its result.

        None when ``until`` was not applied here (the log lost it, or it failed to apply).
        """
        with self._apply_lock:
            while position_key(self.live.position) < position_key(until):
                entries = self.log.range_after(self.live.position, until=until, count=self.batch)
                if not entries:
                    break
                self._apply(entries)
            return self.recent.get(until)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="unimatch-changes", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                entries = self.log.read(self.live.position, count=self.batch, block_ms=max(1, int(self.poll_s * 1e3)))
                if entries:
                    with self._apply_lock:
                        self._apply(entries)
            except Exception as exc:  # Redis down: keep serving what is applied, retry
                self.errors += 1
                log.warning("change log %s: %s", self.log.key, exc)
                self._stop.wait(max(self.poll_s, 0.5))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
