"""Progress of long CLI steps: a live bar on a terminal, periodic log lines everywhere else.

A bar redraws one line in place, which a log file, ``kubectl logs`` or a CI console shows as nothing
until the end (rich prints no live display when its console is not a terminal) or as thousands of
carriage-return fragments. Off a terminal every long step therefore prints a plain line every
``UNIMATCH_PROGRESS_EVERY_S`` seconds (default 10) and one when it finishes::

    index build: inserting vectors 40,000/100,000 (40%), 3,910/s, ~15 s left

Use :func:`progress` as a context manager around the loop; it yields an ``update(done, total=None,
stage=None, info="")`` callback. The choice of bar or lines is made from the stream the bar would
draw on (stderr), so ``cmd > out.txt`` on a terminal keeps its bar.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TextIO

DEFAULT_EVERY_S = 10.0


class Update(Protocol):
    def __call__(self, done: int, total: int | None = None, *, stage: str | None = None, info: str = "") -> None: ...


def every_s() -> float:
    """Seconds between two progress lines (``UNIMATCH_PROGRESS_EVERY_S``; a bad value keeps the default)."""
    raw = os.environ.get("UNIMATCH_PROGRESS_EVERY_S", "")
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_EVERY_S
    return value if value >= 0 else DEFAULT_EVERY_S


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class LineProgress:
    """The off-terminal form: a line at most every ``interval_s`` seconds, the first and the last always.

    ``clock`` and ``stream`` are injectable so tests check the lines without waiting.
    """

    def __init__(
        self, label: str, total: int | None = None, *, interval_s: float | None = None, stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic, unit: str = "", initial: int = 0,
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.initial = initial  # already done when this run started (a resumed run): not in the rate
        self.interval_s = every_s() if interval_s is None else interval_s
        self.stream = stream
        self.clock = clock
        self.started = clock()
        self._last: float | None = None
        self.stage: str | None = None
        self.done = 0
        self._last_line: tuple[int, str | None] | None = None

    def __call__(self, done: int, total: int | None = None, *, stage: str | None = None, info: str = "") -> None:
        if total is not None:
            self.total = total
        new_stage = stage is not None and stage != self.stage
        if stage is not None:
            self.stage = stage
        self.done = done
        now = self.clock()
        finished = self.total is not None and done >= self.total > 0
        if self._last is None or new_stage or finished or now - self._last >= self.interval_s:
            self.emit(info, now=now)

    def emit(self, info: str = "", *, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        if self._last_line == (self.done, self.stage) and not info:
            return  # the same state twice (a final update after the last step): one line
        self._last, self._last_line = now, (self.done, self.stage)
        what = f"{self.label}: {self.stage}" if self.stage else self.label
        line = f"{what} {self.done:,}" + (f"/{self.total:,}" if self.total else "") + (f" {self.unit}" if self.unit else "")
        elapsed = now - self.started
        parts = []
        if self.total:
            parts.append(f"{self.done / self.total:.0%}")
        if elapsed > 0 and self.done > self.initial:
            rate = (self.done - self.initial) / elapsed
            parts.append(f"{rate:,.1f}/s" if rate < 100 else f"{rate:,.0f}/s")
            if self.total and self.done < self.total:
                parts.append(f"~{_duration((self.total - self.done) / rate)} left")
        parts.append(f"{_duration(elapsed)} elapsed")
        if info:
            parts.append(info)
        print(f"{line} ({', '.join(parts)})", file=self.stream or sys.stderr, flush=True)


@contextlib.contextmanager
def progress(
    label: str, total: int | None = None, *, unit: str = "", enabled: bool = True, stream: TextIO | None = None,
    console: Any = None,
) -> Iterator[Update]:
    """Yield an update callback: a rich bar on a terminal, :class:`LineProgress` lines otherwise.

    ``enabled=False`` (``--no-progress``) yields a callback that does nothing. ``console`` is the rich
    console the bar draws on (default: stderr's).
    """
    if not enabled:
        yield lambda done, total=None, *, stage=None, info="": None
        return
    target = stream or sys.stderr
    if not is_terminal(target):
        lines = LineProgress(label, total, stream=stream, unit=unit)
        yield lines
        if lines.done:
            lines.emit()  # the final state, if the last update was not printed
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    con = console or Console(file=target)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=con, transient=True) as bar:
        task = bar.add_task(label, total=total, info="")

        def update(done: int, total: int | None = None, *, stage: str | None = None, info: str = "") -> None:
            kw: dict[str, Any] = {"completed": done, "info": info}
            if total is not None:
                kw["total"] = total or None
            if stage is not None:
                kw["description"] = f"{label}: {stage}"
            bar.update(task, **kw)

        yield update


@contextlib.contextmanager
def working(
    label: str, *, stream: TextIO | None = None, interval_s: float | None = None, console: Any = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[None]:
    """For a long step with no count to report (an import, an export, a benchmark pass): a spinner on a
    terminal; elsewhere ``still running`` every ``interval_s`` and, if it printed any, a line when done.

    The heartbeat runs in a daemon thread, so it keeps printing while the step holds the main thread
    (reading files, running onnxruntime or torch, both of which release the GIL often enough).
    """
    target = stream or sys.stderr
    if is_terminal(target):
        from rich.console import Console

        with (console or Console(file=target)).status(label):
            yield
        return
    import threading

    every = every_s() if interval_s is None else interval_s
    started = clock()
    stop = threading.Event()
    beats = 0

    def beat() -> None:
        nonlocal beats
        while not stop.wait(every):
            beats += 1
            print(f"{label}: still running ({_duration(clock() - started)} elapsed)", file=target, flush=True)

    thread = threading.Thread(target=beat, name="unimatch-progress", daemon=True)
    thread.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        stop.set()
        thread.join()
        if beats:  # a step shorter than one interval prints nothing (a bad input stays a one-line error)
            print(f"{label}: {'done' if ok else 'stopped'} after {_duration(clock() - started)}", file=target, flush=True)
