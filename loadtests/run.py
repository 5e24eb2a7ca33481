"""Headless load test of a running UniMatch service, and the same workload on the engine alone.

    python -m loadtests.run --host http://127.0.0.1:8000 --users-file users.txt \\
        --steps 5,10,20,40 --step-seconds 30 --out docs/loadtest [--bundle BUNDLE --data DATASET]

Runs Locust headless with the stepped, open-loop shape of ``loadtests/locustfile.py`` and ``--csv``,
reads each step's p50/p95/p99/p99.9 latency, throughput and failures from the CSV stats history (the
shape resets the statistics at each step's measurement start and writes the step windows to a
schedule file), measures ``MatchEngine.match`` in-process on the same bundle and user mix, and writes
``OUT/report.md``, ``OUT/loadtest.png`` and ``OUT/results.json``. ``--users-file`` may also be a dataset
directory (its user ids are exported to ``OUT/raw/users.txt``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
PERCENTILES = ("50%", "95%", "99%", "99.9%")


@dataclass
class StepResult:
    index: int
    offered_rps: float
    users: int
    seconds: float
    requests: int
    failures: int
    throughput_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    p999_ms: float
    client_mean_ms: float = float("nan")
    partial: int = 0
    degraded: int = 0
    cold_start: int = 0
    # mean server-side ms per stage over the step's good answers (the answers' `stats`), when reported
    server_ms: dict[str, float] | None = None


def _num(x: str) -> float:
    return float(x) if x not in ("", "N/A") else float("nan")


def parse_history(history_csv: Path, schedule: dict[str, Any]) -> list[StepResult]:
    """Per-step results from Locust's ``*_stats_history.csv`` (Aggregated rows) and the shape's schedule.

    Within a step's window [measure_start, end] the statistics count only that step (they were reset
    at measure_start), so the window's last row holds the step's percentiles and totals. Throughput is
    the request-count slope between the window's first and last rows (both carry whole-second stamps).
    """
    with history_csv.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["Name"] == "Aggregated"]
    out = []
    for step in schedule["steps"]:
        start, end = float(step["measure_start"]), float(step["end"] or float("inf"))
        # Rows are stamped with whole seconds: one stamped in the reset's own second may predate it.
        window = [r for r in rows if start < int(r["Timestamp"]) <= end]
        if not window:
            continue
        last = window[-1]
        n, fails = int(last["Total Request Count"]), int(last["Total Failure Count"])
        first = window[0]
        dt = int(last["Timestamp"]) - int(first["Timestamp"])
        if dt > 0:
            rps = (n - int(first["Total Request Count"])) / dt
        else:
            rps = n / max(int(last["Timestamp"]) - start, 1.0)
        flags = schedule.get("flags", {}).get(str(step["index"]), {})
        answers = int(flags.get("answers", 0))
        server_ms = {
            key[4:]: round(float(v) / answers, 3) for key, v in flags.items() if key.startswith("sum_") and answers
        } or None
        out.append(
            StepResult(
                index=int(step["index"]),
                offered_rps=float(step["offered_rps"]),
                users=int(step["users"]),
                seconds=round(int(last["Timestamp"]) - start, 1),
                requests=n,
                failures=fails,
                throughput_rps=round(rps, 2),
                p50_ms=_num(last["50%"]),
                p95_ms=_num(last["95%"]),
                p99_ms=_num(last["99%"]),
                p999_ms=_num(last["99.9%"]),
                client_mean_ms=round(_num(last["Total Average Response Time"]), 2),
                partial=int(flags.get("partial", 0)),
                degraded=int(flags.get("degraded", 0)),
                cold_start=int(flags.get("cold_start", 0)),
                server_ms=server_ms,
            )
        )
    return out


def summarize(steps: list[StepResult], engine: dict[str, Any] | None) -> dict[str, Any]:
    """Saturation, the latency at 70% of it, and the ratios against the engine alone (the figures the load targets are stated in)."""
    if not steps:
        return {}
    sat = max(steps, key=lambda s: s.throughput_rps)
    below = [s for s in steps if s.offered_rps < sat.offered_rps]
    at70 = min(steps, key=lambda s: abs(s.offered_rps - 0.7 * sat.throughput_rps))
    out: dict[str, Any] = {
        "saturation_throughput_rps": sat.throughput_rps,
        "saturation_step_offered_rps": sat.offered_rps,
        "failures_below_saturation": sum(s.failures for s in below),
        "step_near_70pct_saturation": {"offered_rps": at70.offered_rps, "p99_ms": at70.p99_ms},
    }
    if engine:
        out["throughput_vs_engine"] = round(sat.throughput_rps / engine["throughput_rps_parallel"], 3)
        out["p99_at_70pct_over_engine_p50"] = round(at70.p99_ms / engine["p50_ms"], 2)
        out["http_redis_overhead_p50_ratio"] = round(min(steps, key=lambda s: s.offered_rps).p50_ms / engine["p50_ms"], 2)
    return out


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def write_plot(steps: list[StepResult], path: Path, engine: dict[str, Any] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [s.offered_rps for s in steps]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for attr, label in (("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99"), ("p999_ms", "p99.9")):
        ax1.plot(x, [getattr(s, attr) for s in steps], marker="o", label=label)
    if engine:
        ax1.axhline(engine["p50_ms"], color="grey", linestyle="--", label="engine alone p50")
    ax1.set_xlabel("offered load (requests/s)")
    ax1.set_ylabel("latency (ms)")
    ax1.set_yscale("log")
    ax1.set_title("POST /match latency vs offered load")
    ax1.legend()
    ax1.grid(True, which="both", alpha=0.3)
    ax2.plot(x, [s.throughput_rps for s in steps], marker="o", label="achieved")
    ax2.plot(x, x, color="grey", linestyle=":", label="offered")
    if engine:
        ax2.axhline(engine["throughput_rps_parallel"], color="grey", linestyle="--", label="engine alone")
    ax2.set_xlabel("offered load (requests/s)")
    ax2.set_ylabel("throughput (requests/s)")
    ax2.set_title("throughput")
    ax2.legend()
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_report(
    out: Path, steps: list[StepResult], summary: dict[str, Any], engine: dict[str, Any] | None, meta: dict[str, Any]
) -> Path:
    """``report.md`` + ``loadtest.png`` + ``results.json`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    if steps:
        write_plot(steps, out / "loadtest.png", engine)
    lines = [
        "# UniMatch load test",
        "",
        f"Command: `{meta.get('command', '')}`",
        "",
        f"Host {meta.get('host')}, {meta.get('step_seconds')} s per step ({meta.get('warmup')} s warm-up left out), "
        f"open-loop pacing at {meta.get('user_rate')} requests/s per simulated user. Machine: {meta.get('machine', '')}. "
        f"Bundle {meta.get('bundle_version')} ({meta.get('num_entities')} entities).",
        "",
        "| offered req/s | users | achieved req/s | p50 ms | p95 ms | p99 ms | p99.9 ms | requests | failures | partial | degraded | cold start | note |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in steps:
        notes = []
        if s.throughput_rps < 0.9 * s.offered_rps:
            notes.append("saturated: achieved < 90% of offered")
        if s.users and s.p99_ms > 1e3 * s.users / s.offered_rps:
            notes.append("p99 > one user's send interval: pacing partly closed-loop")
        lines.append(
            f"| {s.offered_rps:g} | {s.users} | {s.throughput_rps:.1f} | {s.p50_ms:g} | {s.p95_ms:g} | {s.p99_ms:g} | "
            f"{s.p999_ms:g} | {s.requests} | {s.failures} | {s.partial} | {s.degraded} | {s.cold_start} | {'; '.join(notes)} |"
        )
    with_server = [s for s in steps if s.server_ms]
    if with_server:
        lines += [
            "",
            "Where the time goes (means over each step's good answers; server stages from the answers' `stats`,",
            "the rest of the client mean is HTTP, JSON, the event loop and queueing in front of the scoring pool):",
            "",
            "| offered req/s | features ms | user encode ms | search ms | (scorer ms) | server total ms | client mean ms | outside server |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in with_server:
            sm = s.server_ms or {}
            total = sm.get("total_ms", float("nan"))
            client = s.client_mean_ms
            share = (client - total) / client if client and client > 0 else float("nan")
            lines.append(
                f"| {s.offered_rps:g} | {sm.get('features_ms', float('nan')):.2f} | {sm.get('user_encode_ms', float('nan')):.2f} | "
                f"{sm.get('search_ms', float('nan')):.2f} | {sm.get('scorer_ms', float('nan')):.2f} | {total:.2f} | "
                f"{client:.1f} | {share:.0%} |"
            )
    lines += [
        "",
        "Latency percentiles are Locust's (whole milliseconds, coarser buckets above 100 ms). A step is measured",
        "after its warm-up; 'partial', 'degraded' and 'cold start' count answers carrying those flags.",
        "",
        "![latency and throughput vs offered load](loadtest.png)",
        "",
    ]
    if engine:
        lines += [
            "## Engine alone (in-process, same bundle and user mix)",
            "",
            f"`MatchEngine.match`, intra-op threads 1: p50 {engine['p50_ms']:.2f} ms, p99 {engine['p99_ms']:.2f} ms, "
            f"{engine['throughput_rps_1thread']:.1f} matches/s on 1 thread, {engine['throughput_rps_parallel']:.1f} "
            f"matches/s on {engine['threads']} threads ({engine['matches']} matches).",
            "",
        ]
    if summary:
        lines += ["## Against the targets", ""]
        lines.append(
            f"- saturation throughput {summary['saturation_throughput_rps']:.1f} req/s "
            f"(step offered {summary['saturation_step_offered_rps']:g} req/s); failures below saturation: "
            f"{summary['failures_below_saturation']} (target 0: {_verdict(summary['failures_below_saturation'] == 0)})"
        )
        if "throughput_vs_engine" in summary:
            near = summary["step_near_70pct_saturation"]
            lines.append(f"- service / engine-alone throughput: {summary['throughput_vs_engine']:.2f} (target >= 0.80: {_verdict(summary['throughput_vs_engine'] >= 0.8)})")
            lines.append(
                f"- p99 near 70% of saturation (step offered {near['offered_rps']:g} req/s): {near['p99_ms']:g} ms = "
                f"{summary['p99_at_70pct_over_engine_p50']:.2f} x engine p50 (target <= 3: {_verdict(summary['p99_at_70pct_over_engine_p50'] <= 3)})"
            )
            lines.append(
                f"- HTTP + Redis overhead at the lowest load: service p50 / engine p50 = {summary['http_redis_overhead_p50_ratio']:.2f}"
            )
        lines.append("")
    report = out / "report.md"
    report.write_text("\n".join(lines))
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "steps": [asdict(s) for s in steps], "engine": engine, "summary": summary}, indent=2)
    )
    return report


def measure_engine(
    bundle: Path, data: Path, user_ids: list[str], *, seconds: float, threads: int, seed: int, domains: str, ks: str
) -> dict[str, Any]:
    """The workload's draws on ``MatchEngine`` in-process: latency on one thread, throughput on ``threads``."""
    import numpy as np

    from contracts.bundle import load_bundle
    from contracts.dataset import load_dataset, serving_sequences
    from contracts.features import UserFeatures
    from loadtests.workload import Workload, parse_mix
    from service.engine import MatchEngine

    b = load_bundle(bundle)
    engine = MatchEngine(b, intra_op_threads=1)
    ds = load_dataset(data)
    row = {str(u): i for i, u in enumerate(np.asarray(ds.users.external_id))}
    seq = serving_sequences(ds).astype(np.int64)
    cat = np.asarray(ds.users.cat, dtype=np.int64)
    num = np.asarray(ds.users.num, dtype=np.float32)
    names = list(b.schema.domains)
    wl = Workload(user_ids, parse_mix(domains) or [(d, 1.0) for d in names], parse_mix(ks, int), seed=seed)
    cold = UserFeatures.cold_start(b.schema)

    def one(rng: random.Random) -> float:
        user, domain, k, _ = wl.draw(rng)
        r = row.get(user)
        feats = cold if r is None else UserFeatures(cat=cat[r], num=num[r], seq=seq[r])
        t0 = time.perf_counter()
        engine.match(feats, names.index(domain), k)
        return time.perf_counter() - t0

    rng = random.Random(seed)
    for _ in range(20):  # warm-up: onnxruntime arenas, page cache of the mmapped bundle
        one(rng)
    lat: list[float] = []
    t_end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < t_end:
        lat.append(one(rng))
    single = len(lat) / (time.perf_counter() - t0)
    counts = [0] * threads

    def worker(i: int) -> None:
        r = random.Random(seed + 1 + i)
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            one(r)
            counts[i] += 1

    t0 = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    parallel = sum(counts) / (time.perf_counter() - t0)
    ms = np.sort(np.asarray(lat) * 1e3)
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "throughput_rps_1thread": round(single, 2),
        "throughput_rps_parallel": round(parallel, 2),
        "threads": threads,
        "matches": len(lat) + sum(counts),
    }


def preflight(host: str) -> dict[str, Any]:
    """GET /v1/info once before loading the service: an unreachable host is an error, not a report."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{host.rstrip('/')}/v1/info", timeout=10) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{host}/v1/info does not answer ({exc}): is the service up?") from None


def run_locust(args: argparse.Namespace, users_file: Path, raw: Path) -> tuple[Path, dict[str, Any]]:
    schedule_path = raw / "schedule.json"
    env = dict(os.environ)
    env.update(
        UNIMATCH_LOADTEST_USERS=str(users_file),
        UNIMATCH_LOADTEST_STEPS=args.steps,
        UNIMATCH_LOADTEST_STEP_SECONDS=str(args.step_seconds),
        UNIMATCH_LOADTEST_WARMUP=str(args.warmup),
        UNIMATCH_LOADTEST_USER_RATE=str(args.user_rate),
        UNIMATCH_LOADTEST_SCHEDULE=str(schedule_path),
        UNIMATCH_LOADTEST_DOMAINS=args.domains,
        UNIMATCH_LOADTEST_K=args.k_mix,
        UNIMATCH_LOADTEST_UNKNOWN=str(args.unknown),
        UNIMATCH_LOADTEST_SEED=str(args.seed),
    )
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", args.host,
        "--csv", str(raw / "locust"), "--only-summary", "--loglevel", "WARNING",
    ]  # fmt: skip
    if args.locust_cpus:
        if shutil.which("taskset") is None:
            raise RuntimeError("--locust-cpus needs taskset (util-linux)")
        cmd = ["taskset", "-c", args.locust_cpus, *cmd]
    n_steps = len([s for s in args.steps.split(",") if s.strip()])
    budget = n_steps * args.step_seconds + 60
    from unimatch.progress import progress

    planned = int(n_steps * args.step_seconds)
    with open(raw / "locust.log", "w") as log, progress("loadtest: locust", planned, unit="s") as update:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        started = time.monotonic()
        try:
            while True:  # minutes of steps: a line (or a bar on a terminal) with the step being run
                try:
                    returncode = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    pass
                elapsed = time.monotonic() - started
                if elapsed > budget:
                    raise subprocess.TimeoutExpired(cmd, budget)
                step = min(n_steps, int(elapsed // args.step_seconds) + 1)
                update(min(planned, int(elapsed)), info=f"step {step}/{n_steps}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # Locust exits 1 when any request failed: that is a result to report, not a crash of the run.
    if returncode not in (0, 1) or not schedule_path.exists():
        raise RuntimeError(f"locust failed (exit {returncode}); see {raw / 'locust.log'}")
    return raw / "locust_stats_history.csv", json.loads(schedule_path.read_text())


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.splitlines()[0])
    p.add_argument("--host", required=True, help="base URL of the running service")
    p.add_argument("--users-file", type=Path, required=True, help="user ids, one per line, or a dataset directory")
    p.add_argument("--steps", default="5,10,20,40", help="offered load per step, requests/s")
    p.add_argument("--step-seconds", type=float, default=30.0, help="length of each step")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds at the start of a step not measured")
    p.add_argument("--user-rate", type=float, default=1.0, help="requests/s of one simulated user")
    p.add_argument("--domains", default="", help="domain mix name:weight,... (default: uniform over /v1/info)")
    p.add_argument("--k-mix", default="10:0.6,50:0.3,100:0.1", help="k mix k:weight,...")
    p.add_argument("--unknown", type=float, default=0.05, help="share of requests for unknown users")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/loadtest"), help="report directory")
    p.add_argument("--bundle", type=Path, default=None, help="bundle the service serves: also measure the engine alone")
    p.add_argument("--data", type=Path, default=None, help="dataset of the bundle (user features for the engine run)")
    p.add_argument("--engine-seconds", type=float, default=15.0, help="seconds per engine-alone measurement")
    p.add_argument("--engine-threads", type=int, default=os.cpu_count() or 1, help="threads of the parallel engine run")
    p.add_argument("--locust-cpus", default="", help="pin Locust to these CPUs (taskset -c list, e.g. 1); pin the service yourself")
    p.add_argument("--machine", default="", help="free text for the report: cores, how they were shared")
    return p


def run(args: argparse.Namespace) -> int:
    if (args.bundle is None) != (args.data is None):
        raise ValueError("--bundle and --data go together (the engine-alone run needs both)")
    if args.step_seconds <= args.warmup:
        raise ValueError("--step-seconds must exceed --warmup")
    if args.bundle is not None:  # before the service is loaded or anything is written
        from loadtests.inputs import check_bundle_and_data

        check_bundle_and_data(args.bundle, args.data)
    raw = args.out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    users_file = args.users_file
    if users_file.is_dir():
        from loadtests.users import export_user_ids

        export_user_ids(users_file, raw / "users.txt")
        users_file = raw / "users.txt"
    if not users_file.is_file():
        raise FileNotFoundError(f"--users-file {users_file} not found")
    info = preflight(args.host)
    engine = None
    if args.bundle is not None:
        from loadtests.workload import read_user_ids

        print(f"loadtest: measuring the engine alone ({2 * args.engine_seconds:g} s) ...", file=sys.stderr, flush=True)
        engine = measure_engine(
            args.bundle, args.data, read_user_ids(str(users_file)), seconds=args.engine_seconds,
            threads=args.engine_threads, seed=args.seed, domains=args.domains, ks=args.k_mix,
        )  # fmt: skip
    history, schedule = run_locust(args, users_file, raw)
    steps = parse_history(history, schedule)
    meta = {
        "command": "python -m loadtests.run " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "host": args.host,
        "step_seconds": args.step_seconds,
        "warmup": args.warmup,
        "user_rate": args.user_rate,
        "machine": (args.machine or f"{os.cpu_count()} cores")
        + (f"; Locust pinned to CPUs {args.locust_cpus}" if args.locust_cpus else ""),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bundle_version": info.get("bundle_version"),
        "num_entities": info.get("num_entities"),
    }
    report = write_report(args.out, steps, summarize(steps, engine), engine, meta)
    print(report.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"loadtests.run: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
