"""OS scheduling priority of one thread: the live catalogue's applier runs on what serving leaves.

Linux schedules threads, not processes, so a thread can take a policy of its own:

* ``idle``: ``SCHED_IDLE``, the weakest class; it runs only on a core no normal thread wants, and it
  is preempted as soon as one does. Allowed without privileges (lowering always is).
* ``nice``: ``SCHED_OTHER`` at nice 19 (the fallback where ``SCHED_IDLE`` is missing or refused).
* ``normal``: left as it is.

Only the calling thread (``threading.get_native_id()``) is changed; the GIL it shares with the serving
threads is not, which is why the applier keeps its GIL-held sections short (service/changes.py).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Literal

log = logging.getLogger("unimatch.priority")

Priority = Literal["idle", "nice", "normal"]
PRIORITIES: tuple[Priority, ...] = ("idle", "nice", "normal")
NICE_LOWEST = 19


def _set_idle(tid: int) -> None:
    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))


def _set_nice(tid: int) -> None:
    os.setpriority(os.PRIO_PROCESS, tid, NICE_LOWEST)


def set_thread_priority(priority: Priority) -> str:
    """Give the calling thread ``priority``; returns what it got ("idle", "nice 19" or "normal").

    A policy the OS refuses falls back to the next one (idle -> nice -> normal), with a warning: the
    applier then still runs, only without the lower priority.
    """
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
    tid = threading.get_native_id()
    if priority == "idle":
        if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
            try:
                _set_idle(tid)
                return "idle"
            except OSError as exc:
                log.warning("SCHED_IDLE refused for thread %d (%s): nice %d instead", tid, exc, NICE_LOWEST)
        priority = "nice"
    if priority == "nice":
        try:
            _set_nice(tid)
            return f"nice {NICE_LOWEST}"
        except (OSError, AttributeError) as exc:
            log.warning("nice %d refused for thread %d (%s): normal priority", NICE_LOWEST, tid, exc)
    return "normal"


def thread_priority(tid: int | None = None) -> str:
    """What a thread runs at now, as ``set_thread_priority`` names it (tests, /health)."""
    tid = threading.get_native_id() if tid is None else tid
    if hasattr(os, "sched_getscheduler") and hasattr(os, "SCHED_IDLE"):
        if os.sched_getscheduler(tid) == os.SCHED_IDLE:
            return "idle"
    nice = os.getpriority(os.PRIO_PROCESS, tid)
    return f"nice {nice}" if nice > 0 else "normal"
