"""Locust workload for UniMatch: ``POST /match`` as the ranking stage calls it.

Self-contained (locust + stdlib only) so that it also runs in the stock ``locustio/locust`` image.
Configured by environment variables:

=================================  ===========================================================  ==========
``UNIMATCH_LOADTEST_USERS``        text file of user ids, one per line (``python -m loadtests.users``)  required
``UNIMATCH_LOADTEST_ZIPF``         Zipf exponent s of user popularity (rank r drawn ~ 1/r^s)     1.1
``UNIMATCH_LOADTEST_UNKNOWN``      share of requests for users the feature store never saw       0.05
``UNIMATCH_LOADTEST_DOMAINS``      domain mix ``name:weight,...`` (empty: uniform over /v1/info)  ""
``UNIMATCH_LOADTEST_K``            k mix ``k:weight,...``                                        10:0.6,50:0.3,100:0.1
``UNIMATCH_LOADTEST_STEPS``        offered load per step, requests/s                             5,10,20,40
``UNIMATCH_LOADTEST_STEP_SECONDS`` length of each step                                           30
``UNIMATCH_LOADTEST_WARMUP``       seconds at the start of a step left out of its statistics     5
``UNIMATCH_LOADTEST_USER_RATE``    requests/s of one simulated user (users = offered / rate)     1
``UNIMATCH_LOADTEST_SCHEDULE``     JSON file the shape writes: step windows and answer flags      unset
``UNIMATCH_LOADTEST_SEED``         random seed                                                   0
=================================  ===========================================================  ==========

Open-loop pacing with Poisson arrivals: each simulated user starts at a random phase and keeps a send
schedule with exponential gaps (mean 1 / per-user rate), independent of how long answers take, and
the shape sets the number of users to offered-rate / per-user-rate, so a slow answer does not lower the
offered load much (a closed loop would hide tail latency by waiting) and the users together offer a
Poisson stream. (The first version paced every user at exactly 1/rate with ``constant_throughput``; all
users spawned within 0.1 s, so requests came in synchronised bursts of N per interval, and a one-core
service queued them: that alone put ~75 ms of waiting into every answer at 10 req/s.) At the start of each step, after the
warm-up, the shape resets Locust's statistics, so the CSV history row at the end of a step holds that
step's own percentiles and counts; the schedule file says when each step was measured.

Every answer is checked (``check_answer``): status 200, the domain echoed, no more than k items and
exactly k unless the domain has fewer eligible entities or the deadline cut the search
(``partial``), no duplicate entity ids, scores best first. A wrong answer is a Locust failure.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import urllib.request
from typing import Any

from locust import FastHttpUser, LoadTestShape, events, task

try:  # as part of the package (python -m locust -f loadtests/locustfile.py from the repo)
    from loadtests.workload import Workload, check_answer, parse_mix, read_user_ids
except ImportError:  # alone, next to workload.py (the locustio/locust image of docker-compose.yml)
    from workload import Workload, check_answer, parse_mix, read_user_ids  # type: ignore[no-redef]


def _env(name: str, default: str) -> str:
    return os.environ.get(f"UNIMATCH_LOADTEST_{name}", default)


def _steps() -> list[float]:
    return [float(x) for x in _env("STEPS", "5,10,20,40").split(",") if x.strip()]


def _user_rate() -> float:
    return float(_env("USER_RATE", "1"))


SERVER_STAGES = ("features_ms", "user_encode_ms", "search_ms", "scorer_ms", "total_ms")


class _State:
    """Shared by the users of this process: the workload, /v1/info facts and per-step answer flags."""

    workload: Workload | None = None
    eligible: dict[str, int] = {}
    step: int | None = None  # the step being measured (None during warm-ups)
    user_rate = 1.0  # requests/s per user in the current step: offered load / users, exactly
    flags: dict[int, dict[str, float]] = {}
    schedule: list[dict[str, Any]] = []


@events.test_start.add_listener
def _on_test_start(environment: Any, **_: Any) -> None:
    info: dict[str, Any] = {}
    try:
        with urllib.request.urlopen(f"{environment.host.rstrip('/')}/v1/info", timeout=10) as resp:
            info = json.loads(resp.read())
    except OSError:
        pass  # a server without /v1/info: the domain mix must then be given
    _State.eligible = {str(d): int(n) for d, n in (info.get("search") or {}).get("eligible_per_domain", {}).items()}
    domains = parse_mix(_env("DOMAINS", "")) or [(d, 1.0) for d in info.get("domains", [])]
    path = _env("USERS", "")
    if not path:
        raise RuntimeError("set UNIMATCH_LOADTEST_USERS to a file of user ids (python -m loadtests.users)")
    _State.workload = Workload(
        read_user_ids(path),
        domains,
        parse_mix(_env("K", "10:0.6,50:0.3,100:0.1"), int),
        zipf_s=float(_env("ZIPF", "1.1")),
        unknown=float(_env("UNKNOWN", "0.05")),
        seed=int(_env("SEED", "0")),
    )


class MatchUser(FastHttpUser):
    """One caller of the ranking stage, sending at a fixed rate."""

    def wait_time(self) -> float:
        # next send = previous scheduled send + Exp(rate): a schedule, not a pause after the answer
        self.next_send += self.rng.expovariate(_State.user_rate)
        return max(0.0, self.next_send - time.monotonic())

    def on_start(self) -> None:
        self.rng = random.Random(f"{_env('SEED', '0')}-{id(self)}")
        time.sleep(self.rng.uniform(0.0, 1.0 / _State.user_rate))  # random phase (gevent-patched sleep)
        self.next_send = time.monotonic()

    @task
    def match(self) -> None:
        assert _State.workload is not None  # set by the test_start listener before any user runs
        user_id, domain, k, known = _State.workload.draw(self.rng)
        body = {"user_id": user_id, "domain": domain, "k": k}
        with self.client.post("/match", json=body, name="/match", catch_response=True) as resp:
            try:
                answer = resp.json() if resp.status_code == 200 else None
            except ValueError:
                answer = None
            problem = check_answer(resp.status_code or 0, answer, domain=domain, k=k, eligible=_State.eligible.get(domain))
            if problem:
                resp.failure(problem)
                return
            resp.success()
            if _State.step is None or answer is None:  # answer is a dict here: check_answer passed it
                return
            flags = _State.flags.setdefault(_State.step, {"answers": 0, "partial": 0, "degraded": 0, "cold_start": 0, "unknown": 0})
            flags["answers"] += 1
            flags["unknown"] += not known
            for name in ("partial", "degraded", "cold_start"):
                flags[name] += bool(answer.get(name))
            # Server-side time per stage (the answer's `stats`): summed here, averaged by the runner, so
            # the report can split client latency into server stages and HTTP/queueing.
            stats = answer.get("stats") or {}
            for name in SERVER_STAGES:
                value = stats.get(name)
                if isinstance(value, int | float):
                    flags[f"sum_{name}"] = flags.get(f"sum_{name}", 0.0) + float(value)


class StepShape(LoadTestShape):
    """Steps the offered load (requests/s) through UNIMATCH_LOADTEST_STEPS, one step per STEP_SECONDS."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = _steps()
        self.step_seconds = float(_env("STEP_SECONDS", "30"))
        self.warmup = float(_env("WARMUP", "5"))
        if not self.steps or self.step_seconds <= self.warmup:
            raise ValueError("need at least one step, and STEP_SECONDS > WARMUP")
        self.measured: set[int] = set()

    def _write_schedule(self) -> None:
        path = _env("SCHEDULE", "")
        if not path:
            return
        doc = {"user_rate": _user_rate(), "steps": _State.schedule, "flags": {str(k): v for k, v in _State.flags.items()}}
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)
        os.replace(tmp, path)

    def tick(self) -> tuple[int, float] | None:
        t = self.get_run_time()
        i = int(t // self.step_seconds)
        if _State.schedule and _State.schedule[-1]["end"] is None and i > _State.schedule[-1]["index"]:
            _State.schedule[-1]["end"] = time.time()
            _State.step = None
            self._write_schedule()
        if i >= len(self.steps):
            return None
        users = max(1, math.ceil(self.steps[i] / _user_rate()))
        _State.user_rate = self.steps[i] / users
        if i not in self.measured and t >= i * self.step_seconds + self.warmup:
            self.measured.add(i)
            if self.runner is not None:
                self.runner.stats.reset_all()
            _State.step = i
            _State.schedule.append(
                {"index": i, "offered_rps": self.steps[i], "users": users, "measure_start": time.time(), "end": None}
            )
            self._write_schedule()
        return users, float(max(users, 1) * 10)


@events.quitting.add_listener
def _on_quit(environment: Any, **_: Any) -> None:
    if _State.schedule and _State.schedule[-1]["end"] is None:
        _State.schedule[-1]["end"] = time.time()
    path = _env("SCHEDULE", "")
    if path:
        doc = {"user_rate": _user_rate(), "steps": _State.schedule, "flags": {str(k): v for k, v in _State.flags.items()}}
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)
