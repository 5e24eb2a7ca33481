"""Bounded chaos suite: faults under load against a service and a Redis it starts itself, on loopback.

    python -m loadtests.chaos --bundle BUNDLE --data DATASET [--seconds 4] [--out docs/reliability.md]

Starts ``redis-server`` (a private port and directory) and ``unimatch serve`` (a private port, admin
token, Redis features loaded with ``features load``) on 127.0.0.1, then runs open-loop Poisson load
(an asyncio + httpx generator: the arrival times do not wait for answers) through each scenario:

    baseline, redis-stop (back with its data), redis-restart-empty, redis-hang (SIGSTOP),
    reload-good, reload-corrupted (neighbour ids out of range, checksums recomputed), overload-5x,
    batch-mix (batches of 16 beside singles), slow-clients (idle + slowloris sockets), sigterm-drain

and writes a markdown table (scenario | load | fault | answered | failed | flagged | accepted p99 |
recovery) into ``--out`` (between its chaos markers, keeping the text around them). Every phase has a fixed length, every request a client timeout, every process
it started is stopped at the end (also on Ctrl-C); it touches no other Redis and no other port.
"answered" = HTTP 200; "shed" = 503 (with Retry-After); "failed" = anything else (a 5xx other than a
503, a connection error, a client timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ADMIN = "chaos-token"
HEADER_TIMEOUT_S = 2.0  # the service's UNIMATCH_HEADER_TIMEOUT_S in the run (default 5): slow sockets die sooner
# the answer's own timings (stats): before admission, Redis, waiting for a thread, in the thread, back to the loop
STAGES = ("admitted_ms", "features_ms", "queue_ms", "user_encode_ms", "search_ms", "runqueue_ms", "handoff_ms")
CLIENT_TIMEOUT_S = 5.0  # every request's client timeout: past it the request counts as failed


# ---- processes ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProcess:
    """A private redis-server on loopback whose data lives in ``workdir`` (RDB, saved on stop)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("chaos: redis-server is not on PATH")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--dbfilename", "chaos.rdb",
             "--save", "", "--appendonly", "no", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise SystemExit("chaos: redis-server did not start")

    def command(self, *args: str) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            parts = [f"*{len(args)}\r\n".encode()] + [f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args]
            s.sendall(b"".join(parts))
            return s.recv(4096)

    def stop(self, *, save: bool) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            self.command("SHUTDOWN", "SAVE" if save else "NOSAVE")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)


class ServiceProcess:
    """``unimatch serve`` on a private loopback port; its log goes to ``log``."""

    def __init__(self, bundle: Path, redis_url: str, log: Path, env: dict[str, str], cpus: set[int] | None = None) -> None:
        self.port = free_port()
        self.cpus = cpus  # pinned to these CPUs (inherited by every thread it starts), else unpinned
        self.bundle, self.redis_url, self.log, self.extra_env = bundle, redis_url, log, env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "UNIMATCH_ADMIN_TOKEN": ADMIN, "UNIMATCH_LOG_LEVEL": "warning", **self.extra_env}
        pin = ["taskset", "-c", ",".join(map(str, sorted(self.cpus)))] if self.cpus else []
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [*pin, sys.executable, "-m", "unimatch.cli", "serve", "--bundle", str(self.bundle), "--port", str(self.port),
                 "--redis-url", self.redis_url, "--graceful-timeout", "5"],
                stdout=fh, stderr=subprocess.STDOUT, env=env,
            )
        import httpx

        for _ in range(600):
            if self.proc.poll() is not None:
                raise SystemExit(f"chaos: the service exited with {self.proc.returncode}; see {self.log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base + "/readyz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise SystemExit("chaos: the service did not become ready")

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


# ---- load -----------------------------------------------------------------------------------------
@dataclass
class Answer:
    sent: float  # seconds since the phase started
    status: int  # 0 = no HTTP answer (connection error, client timeout)
    latency: float
    partial: bool = False
    degraded: bool = False
    short: bool = False  # fewer items than asked
    version: str | None = None
    server_s: float = 0.0  # the service's own total (stats.total_ms, from its edge), slowest entry of a batch
    late: float = 0.0  # how far behind its scheduled arrival the generator sent it (the generator's own lag)
    stages: dict[str, float] | None = None  # the service's own split of server_s (ms), slowest entry of a batch


@dataclass
class Phase:
    answers: list[Answer] = field(default_factory=list)
    dropped: int = 0  # arrivals the generator skipped: it already had max_outstanding requests open

    def count(self, pred: Any) -> int:
        return sum(1 for a in self.answers if pred(a))

    @property
    def answered(self) -> int:
        return self.count(lambda a: a.status == 200)

    @property
    def shed(self) -> int:
        return self.count(lambda a: a.status == 503)

    @property
    def failed(self) -> int:
        return self.count(lambda a: a.status not in (200, 503))

    @property
    def flagged(self) -> int:
        return self.count(lambda a: a.status == 200 and (a.partial or a.degraded))

    def p99_ms(self, since: float = 0.0, until: float = float("inf"), *, server: bool = False) -> float | None:
        lat = [a.server_s if server else a.latency for a in self.answers if a.status == 200 and since <= a.sent < until]
        return float(np.percentile(lat, 99)) * 1e3 if lat else None

    def late_p99_ms(self) -> float:
        """p99 of how far behind schedule the generator sent its requests (0 when it kept up)."""
        return float(np.percentile([a.late for a in self.answers], 99)) * 1e3 if self.answers else 0.0

    @property
    def sent_rate(self) -> float:
        """Requests the generator actually sent per second (below the offered rate when it saturates)."""
        if len(self.answers) < 2:
            return 0.0
        span = max(a.sent for a in self.answers) - min(a.sent for a in self.answers)
        return len(self.answers) / span if span > 0 else 0.0


class _StaleConnection(Exception):
    """The connection closed before any byte of the answer (the request may be sent again)."""


class RawConnection:
    """One kept-alive HTTP/1.1 connection, spoken by hand on asyncio streams.

    The generator runs on the cores the service is measured on; httpx costs ~1 ms of Python per
    request, which at a few hundred requests per second saturated the generator (its own backlog
    then showed up as seconds of "latency"). A request here is one write and three reads.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        """``(status, body)``; status 0 on a connection error or a client timeout (the connection is closed).

        A kept-alive connection the server closed while it was idle (its keep-alive timeout) fails
        before any byte of an answer: that request is sent again once on a fresh connection, as
        every HTTP client does; a failure on a fresh connection is the service's.
        """
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        for attempt in range(2):
            reused = self.writer is not None
            try:
                return await asyncio.wait_for(self._post(path, body), max(0.0, give_up - loop.time()))
            except _StaleConnection:
                self.close()
                if reused and attempt == 0:
                    continue
                return 0, b""
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                self.close()
                return 0, b""
        return 0, b""

    async def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        try:
            status_line = await self.reader.readline()
        except ConnectionResetError:
            raise _StaleConnection from None
        if not status_line:
            raise _StaleConnection
        status = int(status_line.split(b" ", 2)[1])
        length, close = 0, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        data = await self.reader.readexactly(length) if length else b""
        if close:
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class ConnectionPool:
    """At most ``size`` connections; :meth:`take` never waits (None: all busy, the arrival is dropped)."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port, self.size = host, port, size
        self.idle: list[RawConnection] = []
        self.busy = 0

    def take(self) -> RawConnection | None:
        if self.idle:
            conn = self.idle.pop()
        elif self.busy < self.size:
            conn = RawConnection(self.host, self.port)
        else:
            return None
        self.busy += 1
        return conn

    def give(self, conn: RawConnection) -> None:
        self.busy -= 1
        self.idle.append(conn)

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


def _host_port(base: str) -> tuple[str, int]:
    host, _, port = base.removeprefix("http://").rstrip("/").rpartition(":")
    return host, int(port)


async def _one(conn: RawConnection, path: str, body: dict[str, Any], t0: float, phase: Phase, k: int, late: float) -> None:
    sent = time.perf_counter()
    status, data = await conn.post(path, json.dumps(body).encode(), CLIENT_TIMEOUT_S)
    latency = time.perf_counter() - sent
    a = Answer(sent - t0, status, latency, late=late)
    if status == 200:
        try:
            parsed = json.loads(data)
        except ValueError:
            a.status = 0  # a 200 that is not JSON: a failure
        else:
            results = parsed["results"] if "results" in parsed else [parsed]
            a.partial = any(x["partial"] for x in results)
            a.degraded = any(x["degraded"] for x in results)
            a.short = any(len(x["items"]) < k for x in results)
            a.version = results[0]["bundle_version"]
            slowest = max(results, key=lambda x: float(x["stats"]["total_ms"]))["stats"]
            a.server_s = float(slowest["total_ms"]) / 1e3
            a.stages = {key: float(slowest.get(key, 0.0)) for key in STAGES}
    phase.answers.append(a)


@dataclass(frozen=True)
class Segment:
    """A stretch of an open-loop phase: ``rate`` arrivals per second of size ``k`` for ``seconds``."""

    seconds: float
    rate: float
    k: int = 10


async def open_loop(
    base: str, users: list[str], domains: list[str], *, rate: float, seconds: float, k: int = 10,
    batch_every: int = 0, batch_size: int = 16, during: Any = None, seed: int = 0, max_outstanding: int = 300,
    segments: list[Segment] | None = None,
) -> Phase:
    """Poisson arrivals at ``rate`` per second for ``seconds`` (or through ``segments`` in turn, without a
    pause between them); ``during(t0)`` runs beside them.

    At most ``max_outstanding`` requests are open at once (one connection each): an arrival finding
    them all busy is counted in ``dropped`` and not sent, never queued in the generator, so the
    generator's own backlog cannot pass for the service's latency. ``Answer.late`` is how far behind
    its Poisson schedule the generator sent each request (its own event-loop lag).
    """
    rng = random.Random(seed)
    phase = Phase()
    pool = ConnectionPool(*_host_port(base), max_outstanding)
    plan = segments or [Segment(seconds, rate, k)]
    tasks: set[asyncio.Task[None]] = set()
    t0 = time.perf_counter()
    side = asyncio.create_task(during(t0)) if during is not None else None
    start, i = 0.0, 0
    try:
        for seg in plan:
            end = start + seg.seconds
            # a rate of 0 (a capacity run that got no answer) sends nothing for the segment's time
            next_at = start + rng.expovariate(seg.rate) if seg.rate > 0 else end
            while next_at < end:
                delay = t0 + next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                late = max(0.0, -delay)
                i += 1
                conn = pool.take()
                if conn is None:
                    phase.dropped += 1
                    next_at += rng.expovariate(seg.rate)
                    continue
                if batch_every and i % batch_every == 0:
                    reqs = [{"user_id": rng.choice(users), "domain": rng.choice(domains), "k": seg.k} for _ in range(batch_size)]
                    coro = _one(conn, "/match/batch", {"requests": reqs}, t0, phase, seg.k, late)
                else:
                    body = {"user_id": rng.choice(users), "domain": rng.choice(domains), "k": seg.k}
                    coro = _one(conn, "/match", body, t0, phase, seg.k, late)
                task = asyncio.create_task(coro)
                tasks.add(task)

                def finished(t: asyncio.Task[None], c: RawConnection = conn) -> None:
                    tasks.discard(t)
                    pool.give(c)

                task.add_done_callback(finished)
                next_at += rng.expovariate(seg.rate)
            start = end
        if tasks:
            await asyncio.gather(*tasks)
        if side is not None:
            await side
    finally:
        pool.close()
    return phase


async def capacity(base: str, users: list[str], domains: list[str], seconds: float, k: int = 10) -> float:
    """Closed-loop throughput with 8 clients at ``k``: the service's saturation rate (answers per second)."""
    host, port = _host_port(base)
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(j: int) -> None:
        nonlocal done
        rng = random.Random(j)
        conn = RawConnection(host, port)
        while time.perf_counter() < stop:
            body = {"user_id": rng.choice(users), "domain": rng.choice(domains), "k": k}
            status, _ = await conn.post("/match", json.dumps(body).encode(), CLIENT_TIMEOUT_S)
            done += status == 200
        conn.close()

    await asyncio.gather(*(worker(j) for j in range(8)))
    return done / seconds


# ---- bundle corruption ----------------------------------------------------------------------------
def corrupted_copy(bundle: Path, dst: Path) -> Path:
    """A copy whose layer-0 neighbour list holds an out-of-range id, with every checksum recomputed."""
    shutil.copytree(bundle, dst)
    rel = "graph/layer0_neighbors.npy"
    nbr = np.load(dst / rel).copy()
    nbr[len(nbr) // 2] = int(np.load(dst / "graph/levels.npy").shape[0]) + 7
    np.save(dst / rel, nbr, allow_pickle=False)
    manifest = json.loads((dst / "manifest.json").read_text())
    for section in (manifest.get("files", {}), manifest.get("graph", {}).get("files", {})):
        for name, meta in section.items():
            meta["sha256"] = hashlib.sha256((dst / name).read_bytes()).hexdigest()
            meta["bytes"] = (dst / name).stat().st_size
    manifest["bundle_version"] = str(manifest.get("bundle_version", "")) + "-corrupted"
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


# ---- scenarios ------------------------------------------------------------------------------------
@dataclass
class Row:
    scenario: str
    load: str
    fault: str
    phase: Phase
    recovery: str
    sent: int = 0

    def cells(self) -> list[str]:
        p = self.phase
        p99, p99_server = p.p99_ms(), p.p99_ms(server=True)
        complete = p.count(lambda a: a.status == 200 and not a.partial and not a.short)
        latency = f"{p99_server:.0f} / {p99:.0f} ms" if p99 is not None and p99_server is not None else "-"
        return [
            self.scenario, f"{self.load}; sent {p.sent_rate:.0f}/s" + (f", {p.dropped:,} not sent" if p.dropped else ""), self.fault, f"{p.answered:,} ({complete:,} complete)",
            f"{p.failed:,}", f"{p.flagged:,}", latency, f"{p.shed:,}", self.recovery,
        ]


def windows(answers: list[Answer], width: float) -> list[dict[str, float | int | None]]:
    """Per window of ``width`` seconds of send time: answers by status and the 200s' p99, server and client."""
    if not answers:
        return []
    out = []
    n = int(max(a.sent for a in answers) // width) + 1
    for w in range(n):
        inside = [a for a in answers if w * width <= a.sent < (w + 1) * width]
        ok = [a for a in inside if a.status == 200]
        out.append({
            "t": round(w * width, 3), "answered": len(ok), "shed": sum(a.status == 503 for a in inside),
            "failed": sum(a.status not in (200, 503) for a in inside),
            "server_p99_ms": float(np.percentile([a.server_s for a in ok], 99)) * 1e3 if ok else None,
            "client_p99_ms": float(np.percentile([a.latency for a in ok], 99)) * 1e3 if ok else None,
        })
    return out


def recovery(after: list[Answer], burst_end: float, base_server_ms: float, base_client_ms: float,
             width: float = 0.5, baseline: list[Answer] | None = None) -> dict[str, float | None]:
    """When the p99 of the 200s came back within the baseline's after the burst, server side (the
    service's own ``total_ms``) and client side, in ``width`` windows.

    The threshold is 1.5 x the baseline's p99 (at least +10 ms) or, if higher, the 90th percentile of
    the baseline phase's own window p99s (a window holds a few dozen answers at baseline load, so its
    p99 is nearly its maximum: the baseline itself has windows that high). ``{side}_s``: seconds from
    the burst's end to the first window within it (None: none in the phase); ``{side}_later_above``
    / ``{side}_later``: how many windows after that one were above it again, to be read beside
    ``{side}_base_above`` / ``{side}_base``, the same count over the baseline phase (a shared host
    puts some windows above in both: more after the burst than in the baseline is what would say
    the burst left something behind).
    """
    shifted = [Answer(a.sent - burst_end, a.status, a.latency, server_s=a.server_s) for a in after]
    ws = windows(shifted, width)
    base_ws = windows(baseline, width) if baseline else []

    def values(wins: list[dict[str, float | int | None]], side: str) -> list[float]:
        return [float(v) for v in (w[f"{side}_p99_ms"] for w in wins) if v is not None]

    def limit_of(side: str, base: float) -> float:
        own = values(base_ws, side)
        return max(1.5 * base, base + 10.0, float(np.percentile(own, 90)) if own else 0.0)

    out: dict[str, float | None] = {"threshold_ms": limit_of("server", base_server_ms)}
    for side, base in (("server", base_server_ms), ("client", base_client_ms)):
        limit = limit_of(side, base)
        seq = [w[f"{side}_p99_ms"] for w in ws]
        first = next((i for i, v in enumerate(seq) if v is not None and float(v) <= limit), None)
        out[f"{side}_s"] = None if first is None else first * width
        later = [float(v) for v in seq[first + 1:] if v is not None] if first is not None else []
        out[f"{side}_later"] = float(len(later))
        out[f"{side}_later_above"] = float(sum(v > limit for v in later))
        own = values(base_ws, side)
        out[f"{side}_base"] = float(len(own))
        out[f"{side}_base_above"] = float(sum(v > limit for v in own))
    return out


def tail_split(phase: Phase, share: float = 0.01) -> dict[str, float]:
    """Mean of the service's own stage timings (ms) over the slowest ``share`` of the 200s (server side)."""
    ok = sorted((a for a in phase.answers if a.status == 200 and a.stages), key=lambda a: a.server_s)
    tail = ok[-max(1, int(len(ok) * share)):] if ok else []
    out = {key: float(np.mean([(a.stages or {}).get(key, 0.0) for a in tail])) if tail else 0.0 for key in STAGES}
    out["total_ms"] = float(np.mean([a.server_s for a in tail])) * 1e3 if tail else 0.0
    return out


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial share (95% for z = 1.96): honest at shares near 1 and
    small n, where the normal interval passes 100%. (0, 1) for n = 0.

    At 5 x capacity a burst answers a few hundred requests: 99% complete then means one or two cut
    answers, and the interval says whether a run can tell 99% from 97% at all.
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def complete_share(phase: Phase) -> tuple[int, int]:
    """(complete answers, 200s) of a phase: complete = not partial and k items."""
    return phase.count(lambda a: a.status == 200 and not a.partial and not a.short), phase.answered


def pooled_overload(rows: list[Row]) -> str | None:
    """One line over every overload burst of the run: complete share with its Wilson interval, the
    accepted p99 over all of them, failed. None with fewer than two bursts."""
    over = [r for r in rows if r.scenario.startswith("overload-5x") and r.phase.answers]
    if len(over) < 2:
        return None
    done = sum(complete_share(r.phase)[0] for r in over)
    n = sum(r.phase.answered for r in over)
    lo, hi = wilson(done, n)
    server = [a.server_s for r in over for a in r.phase.answers if a.status == 200]
    p99 = float(np.percentile(server, 99)) * 1e3 if server else float("nan")
    failed = sum(r.phase.failed for r in over)
    return (f"Overload, the {len(over)} bursts pooled: {done:,} of {n:,} answers complete = {done / max(1, n):.2%} "
            f"(95% Wilson interval {lo:.2%}-{hi:.2%}); accepted p99 (server) over all of them {p99:.0f} ms; "
            f"{sum(r.phase.shed for r in over):,} answered 503; {failed} failed.")


def _secs(value: float | None) -> str:
    return "not within the phase" if value is None else f"{value:.1f} s"


def _last_degraded(phase: Phase) -> float | None:
    times = [a.sent for a in phase.answers if a.status == 200 and a.degraded]
    return max(times) if times else None


async def run_chaos(args: argparse.Namespace, curves: list[dict[str, Any]] | None = None) -> list[Row]:
    """Every scenario in turn; the overload runs' per-window curves are appended to ``curves``."""
    from service.features import load_features

    work = Path(tempfile.mkdtemp(prefix="unimatch-chaos-"))
    redis = RedisProcess(work)
    rows: list[Row] = []
    curves = [] if curves is None else curves
    started = time.perf_counter()

    def add(row: Row) -> None:
        # progress: one line per finished scenario (plain lines: the suite runs for minutes, mostly off a terminal)
        rows.append(row)
        p = row.phase
        print(f"chaos: {row.scenario} done: {p.answered} answered, {p.shed} shed, {p.failed} failed "
              f"({time.perf_counter() - started:.0f} s elapsed)", flush=True)
    service: ServiceProcess | None = None
    try:
        redis.start()
        load_features(args.data, redis.url)
        schema = json.loads((args.bundle / "schema.json").read_text())
        domains = list(schema["domains"])
        users = [str(u) for u in np.load(args.data / "users/external_id.npy")[: args.users].tolist()]
        env = {"UNIMATCH_DEADLINE_MS": str(args.deadline_ms), "UNIMATCH_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S)}
        service = ServiceProcess(args.bundle, redis.url, work / "service.log", env, cpus=getattr(args, "server_cpus", None))
        service.start()
        base, T = service.base, args.seconds
        mu = await capacity(base, users, domains, min(3.0, T))
        rate = max(1.0, 0.3 * mu)
        load = f"{rate:.0f}/s (0.3 x capacity {mu:.0f}/s)"
        print(f"chaos: capacity ~{mu:.1f} answers/s; baseline load {rate:.1f}/s, {T:g} s per phase", flush=True)

        async def loop(**kw: Any) -> Phase:
            return await open_loop(base, users, domains, rate=kw.pop("rate", rate), seconds=kw.pop("seconds", T), **kw)

        base_phase = await loop()
        base_p99 = base_phase.p99_ms() or 0.0
        add(Row("baseline", load, "none", base_phase, "-"))

        # Redis stop, back with its data after 1/3 of the phase
        back_at: dict[str, float] = {}

        async def stop_and_back(t0: float) -> None:
            await asyncio.sleep(T / 3)
            await asyncio.to_thread(redis.stop, save=True)
            await asyncio.sleep(T / 3)
            await asyncio.to_thread(redis.start)
            back_at["t"] = time.perf_counter() - t0

        ph = await loop(during=stop_and_back)
        last = _last_degraded(ph)
        late = ph.count(lambda a: a.status == 200 and a.degraded and a.sent > back_at["t"] + 1.0)
        add(Row("redis-stop", load, f"Redis stopped {T / 3:.1f} s, back with its data", ph,
                        f"last degraded {max(0.0, (last or 0) - back_at['t']):.2f} s after Redis was back; {late} later than 1 s"))

        # Redis restarted empty: every answer must be flagged
        await asyncio.to_thread(redis.stop, save=False)
        with contextlib.suppress(FileNotFoundError):
            (work / "chaos.rdb").unlink()
        await asyncio.to_thread(redis.start)
        await asyncio.sleep(0.5)
        ph = await loop(seconds=T / 2)
        unflagged = ph.count(lambda a: a.status == 200 and not a.degraded)
        add(Row("redis-restart-empty", load, "Redis back with no data", ph,
                        f"{ph.answered - unflagged}/{ph.answered} answers flagged degraded"))
        await asyncio.to_thread(load_features, args.data, redis.url)
        await asyncio.sleep(1.0)

        # Redis hang (SIGSTOP) then SIGCONT
        cont_at: dict[str, float] = {}

        async def hang(t0: float) -> None:
            await asyncio.sleep(T / 3)
            redis.signal(signal.SIGSTOP)
            await asyncio.sleep(T / 3)
            redis.signal(signal.SIGCONT)
            cont_at["t"] = time.perf_counter() - t0

        ph = await loop(during=hang)
        last = _last_degraded(ph)
        add(Row("redis-hang", load, f"SIGSTOP {T / 3:.1f} s", ph,
                        f"last degraded {max(0.0, (last or 0) - cont_at['t']):.2f} s after SIGCONT"))

        # reloads: a good one and a corrupted one
        import httpx

        corrupt = corrupted_copy(args.bundle, work / "corrupted")
        reload_out: dict[str, Any] = {}

        async def reloads(t0: float) -> None:
            async with httpx.AsyncClient(base_url=base, timeout=60, headers={"Authorization": f"Bearer {ADMIN}"}) as c:
                await asyncio.sleep(T / 4)
                good = await c.post("/admin/reload", params={"wait": "true"}, json={"bundle": str(args.bundle)})
                bad = await c.post("/admin/reload", params={"wait": "true"}, json={"bundle": str(corrupt)})
                reload_out.update(good=good.status_code, bad=bad.status_code)

        ph = await loop(during=reloads)
        versions = {a.version for a in ph.answers if a.version}
        add(Row("reload", load, "reload good, then corrupted", ph,
                        f"good {reload_out.get('good')}, corrupted {reload_out.get('bad')} (refused); "
                        f"versions served: {len(versions)}, corrupted served: {any('corrupted' in v for v in versions)}"))

        # 5x overload at a larger k (each request costs the service more, the generator the same: one
        # Python generator on shared cores cannot send 5 x the k=10 capacity), then the baseline again
        # 5x overload at a larger k (each request costs the service more than it costs the generator),
        # then the baseline load again at once, in the same open loop: the recovery is read from the
        # service's own per-request totals in 0.5 s windows after the burst's end
        ko = args.overload_k
        mu_k = await capacity(base, users, domains, min(3.0, T), k=ko)
        base_server = base_phase.p99_ms(server=True) or 0.0
        if mu_k <= 0:  # 5 x nothing is no load (measured: main's wedged service answered none at k=500)
            add(Row("overload-5x", f"- (capacity at k={ko}: no answer in {min(3.0, T):g} s)", "offered 5 x capacity",
                    Phase(), "not run: the service answered nothing in the capacity run"))
        for run in range(getattr(args, "overload_runs", 1) if mu_k > 0 else 0):
            whole = await loop(segments=[Segment(T, 5 * mu_k, ko), Segment(T, rate, 10)], max_outstanding=400,
                               seed=100 + run)
            over = Phase([a for a in whole.answers if a.sent < T], dropped=whole.dropped)
            after = [a for a in whole.answers if a.sent >= T]
            complete, answered = complete_share(over)
            lo, hi = wilson(complete, answered)
            rec = recovery(after, T, base_server, base_p99, baseline=base_phase.answers)
            tail = tail_split(over)
            curves.append({"run": run + 1, "burst_s": T, "rate": 5 * mu_k, "k": ko, "baseline_server_p99_ms": base_server,
                           "threshold_ms": rec["threshold_ms"], "windows": windows(whole.answers, 0.5)})
            add(Row(
                "overload-5x" + (f" (run {run + 1})" if getattr(args, "overload_runs", 1) > 1 else ""),
                f"{5 * mu_k:.0f}/s at k={ko} (5 x capacity {mu_k:.0f}/s), then {rate:.0f}/s", "offered 5 x capacity", over,
                f"{complete / max(1, answered):.1%} of answers complete (95% interval {lo:.1%}-{hi:.1%}); server p99 <= {rec['threshold_ms']:.0f} ms "
                f"(baseline) again {_secs(rec['server_s'])} after the burst, later windows above it "
                f"{rec['server_later_above']:.0f}/{rec['server_later']:.0f} (baseline phase: {rec['server_base_above']:.0f}/"
                f"{rec['server_base']:.0f}); client p99 {_secs(rec['client_s'])}; "
                f"{sum(a.status == 503 for a in after)} of {len(after)} answers 503 after it; generator late p99 "
                f"{over.late_p99_ms():.0f} ms; slowest 1% of the 200s: {tail['total_ms']:.0f} ms, of it before admission "
                f"{tail['admitted_ms']:.0f}, queue {tail['queue_ms']:.0f}, search {tail['user_encode_ms'] + tail['search_ms']:.0f} "
                f"(waiting for a CPU {tail['runqueue_ms']:.0f}), hand-back {tail['handoff_ms']:.0f} ms",
            ))

        # batches beside singles
        ph = await loop(batch_every=10, batch_size=16)
        add(Row("batch-mix", load + ", every 10th a batch of 16", "none", ph, "-"))

        # slow clients: idle sockets and slowloris beside the load
        closed: dict[str, int] = {}

        async def slow_clients(t0: float) -> None:
            socks = []
            for _ in range(args.slow_sockets):
                with contextlib.suppress(OSError):
                    s = socket.create_connection(("127.0.0.1", service.port), timeout=1)  # type: ignore[union-attr]
                    s.setblocking(False)
                    socks.append(s)
            for s in socks[: len(socks) // 2]:
                with contextlib.suppress(OSError):
                    s.send(b"POST /match HTTP/1.1\r\nHost: x\r\n")  # never finished
            await asyncio.sleep(HEADER_TIMEOUT_S + 1.0)  # the server's header timeout, and a second of slack
            n = 0
            for s in socks:
                try:
                    n += s.recv(1) == b""
                except BlockingIOError:
                    pass
                except OSError:
                    n += 1
                s.close()
            closed.update(sockets=len(socks), closed=n)

        ph = await loop(during=slow_clients)
        add(Row("slow-clients", load, f"{closed.get('sockets', 0)} idle/slowloris sockets", ph,
                        f"{closed.get('closed', 0)}/{closed.get('sockets', 0)} closed by the server within {HEADER_TIMEOUT_S + 1:.0f} s"))

        # SIGTERM drain: requests sent before the signal must be answered
        term_at: dict[str, float] = {}

        async def sigterm(t0: float) -> None:
            await asyncio.sleep(T / 2)
            term_at["t"] = time.perf_counter() - t0
            service.terminate()  # type: ignore[union-attr]

        ph = await loop(during=sigterm)
        before = Phase([a for a in ph.answers if a.sent < term_at["t"]])
        rc = await asyncio.to_thread(service.wait, 15)
        add(Row("sigterm-drain", load, "SIGTERM mid-load", before,
                        f"exit {rc}; {ph.count(lambda a: a.sent >= term_at['t'])} sent after SIGTERM not counted"))
        service = None
    finally:
        if service is not None:
            service.terminate()
            service.wait(15)
        redis.stop(save=False)
        shutil.rmtree(work, ignore_errors=True)
    return rows


def render(rows: list[Row], args: argparse.Namespace) -> str:
    head = ["scenario", "load", "fault", "answered", "failed", "flagged", "accepted p99 server / client", "shed (503)", "recovery"]
    lines = [
        "answered = HTTP 200 (complete = not partial and k items); failed = any answer other than 200/503, a",
        "connection error or a 5 s client timeout; flagged = answered `partial` or `degraded`; accepted p99 = p99",
        "latency of the 200s as the service measured it (from its edge, `stats.total_ms`) / as the client saw it;",
        "shed = 503 with Retry-After (admission control); load = the offered rate, what the generator really",
        "sent, and arrivals it did not send because all its connections (300; 400 in the overload phase) were",
        "busy: the generator drops, it never queues. Open-loop Poisson load from hand-written HTTP/1.1 on",
        "kept-alive connections (asyncio streams); the service's own loopback Redis. Overload recovery: from",
        "the burst's end, the first 0.5 s window whose p99 of the 200s is within the baseline's (1.5 x its",
        "p99, at least +10 ms, or the 90th percentile of its own 0.5 s windows), and how many later windows",
        "were above it again beside the same count in the baseline phase.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    pooled = pooled_overload(rows)
    if pooled is not None:
        lines += ["", pooled]
    cmd = (f"python -m loadtests.chaos --bundle {args.bundle} --data {args.data} --seconds {args.seconds:g} "
           f"--overload-k {args.overload_k} --overload-runs {getattr(args, 'overload_runs', 1)}")
    for flag, cpus in (("--server-cpus", getattr(args, "server_cpus", None)), ("--client-cpus", getattr(args, "client_cpus", None))):
        if cpus:
            cmd += f" {flag} {','.join(map(str, sorted(cpus)))}"
    loads = getattr(args, "load_averages", None)
    where = f"; load average (1 min) {loads[0]:.2f} at the start, {loads[1]:.2f} at the end" if loads else ""
    return "\n".join(lines) + f"\n\nCommand: `{cmd}` (deadline {args.deadline_ms:g} ms{where}).\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="a bundle with a graph (unimatch index build)")
    p.add_argument("--data", type=Path, required=True, help="the dataset whose users' features are loaded")
    p.add_argument("--seconds", type=float, default=6.0, help="length of each phase (the run takes ~12 phases)")
    p.add_argument("--deadline-ms", type=float, default=100.0, help="UNIMATCH_DEADLINE_MS of the service")
    p.add_argument("--users", type=int, default=2000, help="distinct users drawn from the dataset")
    p.add_argument("--overload-k", type=int, default=500, help="k of the overload phase (its capacity is measured at it)")
    p.add_argument("--slow-sockets", type=int, default=200, help="idle and slowloris sockets in slow-clients")
    p.add_argument("--out", type=Path, default=None, help="write the table here (markdown) as well as printing it")
    p.add_argument("--overload-runs", type=int, default=2, help="times the overload scenario runs (its spread)")
    p.add_argument("--server-cpus", type=_cpus, default=None, metavar="LIST",
                   help="pin the service to these CPUs (taskset -c LIST), e.g. 1")
    p.add_argument("--client-cpus", type=_cpus, default=None, metavar="LIST",
                   help="pin this load generator to these CPUs, e.g. 0")
    p.add_argument("--curves-json", type=Path, default=None, help="write the overload runs' 0.5 s windows here")
    p.add_argument("--plot", type=Path, default=None, help="draw the overload runs' recovery curves here (PNG)")
    args = p.parse_args(argv)
    if args.overload_runs < 1:
        print("chaos: --overload-runs must be >= 1", file=sys.stderr)
        return 2
    if args.server_cpus is not None and shutil.which("taskset") is None:
        print("chaos: --server-cpus needs taskset (util-linux) on PATH", file=sys.stderr)
        return 2
    if args.client_cpus is not None:
        try:
            os.sched_setaffinity(0, args.client_cpus)
        except OSError as exc:
            print(f"chaos: --client-cpus {sorted(args.client_cpus)}: {exc}", file=sys.stderr)
            return 2
    if not 0.5 <= args.seconds <= 120:
        print("chaos: --seconds must be in 0.5..120", file=sys.stderr)
        return 2
    from loadtests.inputs import check_bundle_and_data

    try:  # before Redis and the service start: a bad input is one line, not a service that "did not start"
        check_bundle_and_data(args.bundle, args.data, require_graph=True)
    except ValueError as exc:
        print(f"chaos: error: {exc}", file=sys.stderr)
        return 2
    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # runs the finally blocks: the service and Redis are stopped

    signal.signal(signal.SIGTERM, _terminate)
    curves: list[dict[str, Any]] = []
    start_load = os.getloadavg()[0]
    rows = asyncio.run(run_chaos(args, curves))
    args.load_averages = (start_load, os.getloadavg()[0])
    table = render(rows, args)
    print(table)
    if args.out is not None:
        write_table(args.out, table)
    if args.curves_json is not None:
        from contracts.io import atomic_write_json

        atomic_write_json(args.curves_json, {"command": " ".join(sys.argv), "runs": curves})
    if args.plot is not None:
        plot_recovery(curves, args.plot)
    return 0


def _cpus(text: str) -> set[int]:
    try:
        cpus = {int(c) for c in text.split(",") if c.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated CPU numbers, got {text!r}") from None
    if not cpus or min(cpus) < 0:
        raise argparse.ArgumentTypeError(f"expected CPU numbers >= 0, got {text!r}")
    return cpus


def plot_recovery(curves: list[dict[str, Any]], out: Path) -> None:
    """Server-side and client-side p99 per 0.5 s window through each overload run (burst, then baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 2))
    for c in curves:
        ts = [w["t"] for w in c["windows"]]
        ax.plot(ts, [w["server_p99_ms"] for w in c["windows"]], marker=".", label=f"run {c['run']}: server p99")
        ax.plot(ts, [w["client_p99_ms"] for w in c["windows"]], ls=":", label=f"run {c['run']}: client p99")
        bx.plot(ts, [w["answered"] for w in c["windows"]], label=f"run {c['run']}: 200")
        bx.plot(ts, [w["shed"] for w in c["windows"]], ls="--", label=f"run {c['run']}: 503")
    if curves:
        burst = curves[0]["burst_s"]
        for axis in (ax, bx):
            axis.axvline(burst, color="grey", lw=1)
        ax.axhline(curves[0]["threshold_ms"], color="grey", ls="--", lw=1, label="baseline threshold (server)")
        ax.set_title(f"5 x capacity at k={curves[0]['k']} for {burst:g} s, then the baseline load (line: burst ends)")
    ax.set_ylabel("p99 of the 200s, ms")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    bx.set_ylabel("answers per 0.5 s")
    bx.set_xlabel("seconds since the burst started (send time)")
    bx.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)


BEGIN, END = "<!-- chaos:begin (generated by loadtests/chaos.py) -->", "<!-- chaos:end -->"


def write_table(out: Path, table: str) -> None:
    """Replace the generated block of ``out`` (between the chaos markers), or write the file with one.

    The text around the markers (the analysis in docs/reliability.md) is kept; written atomically.
    """
    block = f"{BEGIN}\n{table.rstrip()}\n{END}"
    old = out.read_text() if out.is_file() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = (old.rstrip() + "\n\n" if old else "") + block + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)


if __name__ == "__main__":
    sys.exit(main())
