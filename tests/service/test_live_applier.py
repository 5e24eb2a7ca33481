"""The change applier: its own OS priority (with fallbacks), the own-change fast path, and acknowledgement order."""

from __future__ import annotations

import os
import threading
import time

import pytest

from contracts.bundle import Bundle
from service import thread_priority as tp
from service.changes import ChangeFollower
from service.live import check_change
from tests.service.test_live import _changes, bundle, engine_of, upsert  # noqa: F401  (bundle: the fixture)

LINUX_IDLE = hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE")


# ---- priority ------------------------------------------------------------------------------------------
def _in_thread(fn) -> tuple[object, str]:  # type: ignore[no-untyped-def]
    """Run ``fn`` on a fresh thread (priorities stick to a thread: never lower the test runner's own)."""
    got: list[tuple[object, str]] = []
    t = threading.Thread(target=lambda: got.append((fn(), tp.thread_priority())))
    t.start()
    t.join()
    return got[0]


@pytest.mark.skipif(not LINUX_IDLE, reason="SCHED_IDLE is Linux's")
def test_idle_priority_is_applied_to_the_calling_thread_only() -> None:
    before = tp.thread_priority()
    assert _in_thread(lambda: tp.set_thread_priority("idle")) == ("idle", "idle")
    assert tp.thread_priority() == before  # the caller's thread is untouched


def test_nice_priority_and_normal() -> None:
    assert _in_thread(lambda: tp.set_thread_priority("nice")) == ("nice 19", "nice 19")
    base = tp.thread_priority()
    assert _in_thread(lambda: tp.set_thread_priority("normal")) == ("normal", base)


def test_idle_refused_falls_back_to_nice_then_normal(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(tid: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(tp, "_set_idle", refuse)
    assert _in_thread(lambda: tp.set_thread_priority("idle")) == ("nice 19", "nice 19")
    monkeypatch.setattr(tp, "_set_nice", refuse)
    base = tp.thread_priority()
    assert _in_thread(lambda: tp.set_thread_priority("idle")) == ("normal", base)
    with pytest.raises(ValueError, match="priority"):
        tp.set_thread_priority("low")  # type: ignore[arg-type]


# ---- a change log without Redis --------------------------------------------------------------------------
class MemoryLog:
    """``ChangeLog``'s interface over a list (JSON as in Redis); ``gate`` holds XADD back while cleared."""

    key = "mem:changes"

    def __init__(self) -> None:
        import json

        self._json = json
        self.entries: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.gate = threading.Event()
        self.gate.set()
        self.reads = 0
        self.fail = False

    def append(self, change: dict) -> str:
        self.gate.wait(5.0)
        if self.fail:
            raise ConnectionError("redis down")
        with self.cond:
            pos = f"1-{len(self.entries) + 1}"
            self.entries.append((pos, self._json.dumps(change, separators=(",", ":")).encode()))
            self.cond.notify_all()
            return pos

    def _after(self, after: str, until: str = "+") -> list[tuple[str, bytes]]:
        from service.live import position_key

        lo = position_key(after)
        hi = position_key(until) if until != "+" else (1 << 62, 0)
        return [(p, r) for p, r in self.entries if lo < position_key(p) <= hi]

    def range_after_raw(self, after: str, until: str = "+", count: int = 1000) -> list[tuple[str, bytes]]:
        self.reads += 1
        with self.cond:
            return self._after(after, until)[:count]

    def read_raw(self, after: str, *, count: int = 1000, block_ms: int = 100) -> list[tuple[str, bytes]]:
        with self.cond:
            if not self._after(after):
                self.cond.wait(block_ms / 1e3)
            got = self._after(after)[:count]
        self.reads += bool(got)
        return got


def _full_state(eng) -> tuple:  # type: ignore[no-untyped-def]
    """Everything an apply writes, as bytes: rows, tables, id embeddings, masks, counts, every overlay list."""
    live = eng.live
    ov = live.overlay
    n = live.E + live.count
    adj = tuple(a[:u].tobytes() for a, u in zip(ov._adj, ov._used.tolist(), strict=True))
    return (live.position, live.count, tuple(live.ids), dict(live._row), tuple(sorted(live.paused)), live.live[:n].tobytes(),
            live.domain_mask[:n].tobytes(), live.entity_type[:n].tobytes(), live.type_counts.tobytes(), live.aid[: live.count].tobytes(),
            tuple(t[: live.count].tobytes() for t in live.tables.values()), ov.levels[: live.count].tobytes(), ov._slot.tobytes(), adj)


def _acknowledge_all(follower: ChangeFollower, schema, changes: list[dict]) -> list[str]:  # type: ignore[no-untyped-def]
    out = []
    for ch in changes:
        pos, res = follower.acknowledge(ch, check_change(schema, ch))
        assert res is not None and res.position == pos
        assert follower.live.position == pos  # applied here before acknowledge returned
        out.append(pos)
    return out


@pytest.mark.parametrize("applier", ["inline", "thread"])
def test_own_changes_from_their_parsed_form_give_the_replayed_state_byte_for_byte(bundle: Bundle, applier: str) -> None:  # noqa: F811
    log = MemoryLog()
    a, b = engine_of(bundle), engine_of(bundle)
    fa = ChangeFollower(log, a.live, poll_s=0.02, priority="idle")  # type: ignore[arg-type]
    if applier == "thread":
        fa.start()
    try:
        changes = _changes(12)
        _acknowledge_all(fa, bundle.schema, changes)
    finally:
        fa.stop()
    assert fa.own_fast == len(changes)  # every own entry was applied from the request's records
    fb = ChangeFollower(log, b.live)  # type: ignore[arg-type]
    assert fb.replay() == len(changes) and fb.own_fast == 0  # the other worker decodes and parses the log
    assert _full_state(a) == _full_state(b)


def test_entries_of_others_between_own_ones_are_decoded_in_order(bundle: Bundle) -> None:  # noqa: F811
    log = MemoryLog()
    a, b = engine_of(bundle), engine_of(bundle)
    fa = ChangeFollower(log, a.live, poll_s=0.02)  # type: ignore[arg-type]
    fa.start()
    try:
        for i, ch in enumerate(_changes(8)):
            if i % 2:
                log.append(ch)  # another worker's change: only in the log
            else:
                pos, res = fa.acknowledge(ch, check_change(bundle.schema, ch))
                assert res is not None and a.live.position == pos  # type: ignore[union-attr]
        for _ in range(200):
            if a.live.position == log.entries[-1][0]:  # type: ignore[union-attr]
                break
            time.sleep(0.01)
    finally:
        fa.stop()
    assert fa.own_fast == 4
    fb = ChangeFollower(log, b.live)  # type: ignore[arg-type]
    fb.replay()
    assert _full_state(a) == _full_state(b)


def test_the_acknowledgement_waits_for_the_xadd_and_the_apply(bundle: Bundle) -> None:  # noqa: F811
    log = MemoryLog()
    eng = engine_of(bundle)
    live = eng.live
    assert live is not None
    f = ChangeFollower(log, live, poll_s=0.02, priority="idle")  # type: ignore[arg-type]
    f.start()
    try:
        ch = upsert(["ack-1", "ack-2"])
        done: list[tuple[str, object]] = []
        t = threading.Thread(target=lambda: done.append(f.acknowledge(ch, check_change(bundle.schema, ch))))
        log.gate.clear()  # XADD not answered yet
        t.start()
        time.sleep(0.2)
        assert not done and not log.entries  # nothing acknowledged before the XADD
        live.lock.acquire()  # the applier cannot apply
        log.gate.set()
        time.sleep(0.3)
        assert log.entries and not done and live.count == 0  # logged, not applied: still not acknowledged
        live.lock.release()
        t.join(5.0)
        assert done and done[0][1] is not None
        assert live.position == done[0][0] and live.row_of("ack-2") is not None
        assert f.priority_applied == ("idle" if LINUX_IDLE else "nice 19")
        # a failed XADD raises and leaves nothing behind
        log.fail = True
        with pytest.raises(ConnectionError):
            f.acknowledge(ch, check_change(bundle.schema, ch))
        assert not f._pending and f._xadds == 0
    finally:
        f.stop()


def test_an_applier_that_does_not_get_there_in_time_is_not_an_acknowledgement(bundle: Bundle) -> None:  # noqa: F811
    log = MemoryLog()
    eng = engine_of(bundle)
    live = eng.live
    assert live is not None
    f = ChangeFollower(log, live, poll_s=0.02, ack_timeout_s=0.2)  # type: ignore[arg-type]
    f.start()
    try:
        ch = upsert(["slow-1"])
        with live.lock:  # the applier is stuck behind the writer lock
            pos, res = f.acknowledge(ch, check_change(bundle.schema, ch))
        assert res is None and log.entries[-1][0] == pos
    finally:
        f.stop()


# ---- yielding to requests in flight ----------------------------------------------------------------------
def test_activity_counts_requests_and_wait_quiet_waits_for_none() -> None:
    from service.activity import Activity

    act = Activity()
    assert act.wait_quiet(0.01)
    with act:
        with act:
            assert act.in_flight == 2
        assert not act.wait_quiet(0.05)  # one still in flight: it gives up after max_s
    got: list[bool] = []
    act.__enter__()
    w = threading.Thread(target=lambda: got.append(act.wait_quiet(5.0)))
    w.start()
    time.sleep(0.1)
    assert not got  # still waiting
    act.__exit__(None, None, None)
    w.join(2.0)
    assert got == [True]


def test_inserting_in_chunks_between_requests_gives_the_same_state(bundle: Bundle) -> None:  # noqa: F811
    a, b = engine_of(bundle), engine_of(bundle)
    b.yield_live_changes(0.5, chunk=2)
    calls: list[int] = []
    hook = b.live.yield_to  # type: ignore[union-attr]
    b.live.yield_to = lambda: calls.append(b.activity.in_flight) or hook()  # type: ignore[union-attr, func-returns-value]
    for i, ch in enumerate(_changes(8)):
        a.live.apply(f"1-{i + 1}", ch)  # type: ignore[union-attr]
        b.live.apply(f"1-{i + 1}", ch)  # type: ignore[union-attr]
    assert calls and set(calls) == {0}  # each chunk went in with no request in flight
    assert _full_state(a) == _full_state(b)
    b.yield_live_changes(0)
    assert b.live.yield_to is None and b.live.insert_chunk == 0  # type: ignore[union-attr]


def test_the_engine_counts_its_requests(bundle: Bundle) -> None:  # noqa: F811
    from tests.service.test_live import users

    eng = engine_of(bundle)
    seen: list[int] = []
    real = eng._run

    def spy(*a):  # type: ignore[no-untyped-def]
        seen.append(eng.activity.in_flight)
        return real(*a)

    eng._run = spy  # type: ignore[method-assign]
    eng.match(users(1)[0], 0, 5)  # match -> query -> run: one request, counted once
    assert seen == [1] and eng.activity.in_flight == 0 and eng.active_searches == 0
