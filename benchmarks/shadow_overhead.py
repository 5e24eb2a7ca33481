"""Does the live coverage monitor cost live requests anything? p99 at a fixed load, shadow rate 0 vs R.

Two drivers, both open loop (Poisson arrivals at ``--rps``, about 70% of capacity):

* ``--driver engine`` (default): one process, the engine as served (calibrated point), requests on a
  pool of scoring threads like the service's (``--threads``, default cores), each latency measured from
  its arrival (queue wait included). The monitor is switched on and off in alternating windows
  (``--window-s``, order ABBA...) inside ONE run, so machine drift falls on both arms alike; per arm the
  pooled p50/p99 over every window, and a bootstrap interval of the p99 ratio (windows resampled
  within each arm). Each group of adjacent windows (one per arm) replays the same Poisson arrivals and
  queries (common random numbers; ``--no-paired`` draws afresh), and the per-group p99 ratios give a
  paired estimate (geometric mean, bootstrap interval over groups) that one stalled window moves less. This is the measurement the target is about: the monitor's thread competes with
  the request threads for CPU and the GIL, nothing else differs. ``--rps`` defaults to 70% of the
  closed-loop capacity it measures first.
* ``--driver http``: ``unimatch serve`` started twice per round (rate 0, then R), one open-loop Locust
  step of ``unimatch loadtest`` each; rounds alternate A/B. Includes HTTP and Redis-less features, and
  a restart between arms (start-up variance: use many rounds).

    python -m benchmarks.shadow_overhead --bundle B --data D --rate 0.01 --windows 16 --md docs/x.md
    python -m benchmarks.shadow_overhead --driver http --bundle B --data D --rps 60 --rate 0.01 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, timeout: float = 180.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"service at {url} not ready after {timeout:.0f} s")


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        total = 0.0
        for line in r.read().decode().splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total


def one_run(bundle: Path, data: Path, rps: float, seconds: float, rate: float, out: Path) -> dict[str, Any]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "UNIMATCH_SHADOW_RATE": str(rate), "UNIMATCH_LOG_LEVEL": "warning"}
    env.pop("UNIMATCH_REDIS_URL", None)
    exe = Path(sys.executable).parent / "unimatch"
    srv = subprocess.Popen([str(exe), "serve", "--bundle", str(bundle), "--data", str(data), "--port", str(port)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(url)
        subprocess.run([str(exe), "loadtest", "--host", url, "--users-file", str(data), "--steps", str(rps),
                        "--step-seconds", str(seconds), "--warmup", "5", "--k-mix", "200:1", "--out", str(out)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=seconds + 300)
        step = json.loads((out / "results.json").read_text())["steps"][0]
        step["shadow_samples"] = _metric(url, "unimatch_search_shadow_coverage_count")
        step["shadow_coverage_sum"] = _metric(url, "unimatch_search_shadow_coverage_sum")
        step["shadow_dropped"] = _metric(url, "unimatch_search_shadow_dropped_total")
        return step
    finally:
        srv.terminate()
        try:
            srv.wait(timeout=30)
        except subprocess.TimeoutExpired:
            srv.kill()


# ---- engine driver ---------------------------------------------------------------------------------
def _engine_setup(bundle_dir: Path, data: Path, users: int) -> tuple[Any, list[tuple[Any, int]]]:
    from contracts.bundle import load_bundle
    from service.bench.search_bench import held_out_queries
    from service.engine import MatchEngine

    bundle = load_bundle(bundle_dir)
    engine = MatchEngine(bundle, providers=["CPUExecutionProvider"], intra_op_threads=1)
    engine.warmup()
    q = held_out_queries(data, bundle, users, 0)
    return engine, list(zip(q.features, (int(d) for d in q.domains), strict=True))


def _capacity(engine: Any, queries: list, k: int, threads: int, seconds: float) -> float:
    """Closed-loop answers/s with ``threads`` clients (the pool's own size) for ``seconds``."""
    import threading

    stop = time.monotonic() + seconds
    done = [0] * threads

    def client(i: int) -> None:
        j = i
        while time.monotonic() < stop:
            u, d = queries[j % len(queries)]
            engine.match(u, d, k)
            done[i] += 1
            j += threads

    ts = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(done) / (time.monotonic() - t0)


def _window(engine: Any, queries: list, k: int, pool: Any, rps: float, seconds: float, monitor: Any,
            rng: np.random.Generator, offset: int) -> np.ndarray:
    """One open-loop window: Poisson arrivals at ``rps`` for ``seconds``; latencies (ms) from arrival."""
    from concurrent.futures import wait

    def one(arrival: float, u: Any, d: int) -> float:
        res = engine.match(u, d, k)
        if monitor is not None:  # what routes/match.py does after answering
            monitor.offer(engine, d, k, u, res)
        return (time.perf_counter() - arrival) * 1e3

    futures = []
    t0 = time.perf_counter()
    at = t0
    i = offset
    while True:
        at += float(rng.exponential(1.0 / rps))
        if at - t0 >= seconds:
            break
        delay = at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        u, d = queries[i % len(queries)]
        futures.append(pool.submit(one, at, u, d))
        i += 1
    wait(futures)
    return np.array([f.result() for f in futures], dtype=np.float64)


# Arms of the engine driver: the monitor off, on (as served: it yields to requests), and optionally on
# without yielding (the monitor before the sixth session: only its OS priority kept it out of the way).
OFF, ON, NO_YIELD, ANY_FREE = "off", "on", "on, no yield", "on, any free CPU"


def _arm_order(arms: list[str], windows: int) -> list[str]:
    """A B B A ... for two arms, A B C C B A ... for three: drift cancels to first order."""
    cycle = arms + arms[::-1]
    return [cycle[w % len(cycle)] for w in range(windows)]


def engine_ab(args: argparse.Namespace) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    from service.shadow import ShadowMonitor

    class _CountingMonitor(ShadowMonitor):
        coverage_sum = 0.0

        def run_job(self, job: Any) -> float | None:
            cov = super().run_job(job)
            if cov is not None:  # None: dropped, no free CPU for max_wait_s
                self.coverage_sum += cov
            return cov

    engine, queries = _engine_setup(args.bundle, args.data, args.users)
    threads = args.threads or (os.cpu_count() or 1)
    cap = _capacity(engine, queries, args.k, threads, args.capacity_s)
    rps = args.rps or 0.7 * cap
    print(f"capacity {cap:.1f} answers/s with {threads} threads (closed loop, {args.capacity_s:.0f} s); offered {rps:.1f} req/s",
          flush=True)
    rng = np.random.default_rng(0)
    names = [OFF, ON] + ([NO_YIELD] if args.no_yield_arm else []) + ([ANY_FREE] if args.any_free_arm else [])
    arms: dict[str, list[np.ndarray]] = {a: [] for a in names}
    counts = {a: {"samples": 0, "dropped": 0, "starved": 0, "coverage_sum": 0.0} for a in names[1:]}
    windows = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        if args.warmup_s > 0:  # first windows ran hot or cold in both arms in earlier runs: one not counted
            _window(engine, queries, args.k, pool, rps, args.warmup_s, None, rng, 7)
        for w, arm in enumerate(_arm_order(names, args.windows)):
            monitor = None if arm == OFF else _CountingMonitor(
                rate=args.rate, seed=w, yield_to_requests=arm != NO_YIELD,
                spare_cpus=0 if arm == ANY_FREE else args.spare_cpus)
            # Common random numbers: the windows of one group (one window per arm, adjacent in time) get
            # the same arrival times and the same queries, so their p99s differ by the monitor and the
            # machine, not by one group's burstier Poisson draw (at 70% load the draw alone moves p99 a lot).
            group = w // len(names)
            wrng = np.random.default_rng(10_000 + group) if args.paired else rng
            offset = (group if args.paired else w) * 100_003
            lat = _window(engine, queries, args.k, pool, rps, args.window_s, monitor, wrng, offset)
            if monitor is not None:
                monitor.close()
                c = counts[arm]
                c["samples"] += monitor.done
                c["dropped"] += monitor.dropped
                c["starved"] += monitor.starved
                c["coverage_sum"] += monitor.coverage_sum
            arms[arm].append(lat)
            windows.append({"window": w, "group": group, "arm": arm, "rate": 0.0 if arm == OFF else args.rate, "requests": int(lat.size),
                            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                            "shadow_done": monitor.done if monitor is not None else 0,
                            "loadavg": os.getloadavg()[0]})
            print(f"window {w} {arm}: {lat.size} requests, p50 {windows[-1]['p50_ms']:.1f} ms, "
                  f"p99 {windows[-1]['p99_ms']:.1f} ms, load average {windows[-1]['loadavg']:.1f}", flush=True)
    pooled = {a: np.concatenate(v) for a, v in arms.items()}
    p99 = {a: float(np.percentile(v, 99)) for a, v in pooled.items()}
    per_window = {a: [float(np.percentile(x, 99)) for x in v] for a, v in arms.items()}
    ratios: dict[str, Any] = {}
    brng = np.random.default_rng(1)
    for a in names[1:]:
        boot = []
        for _ in range(2000):
            pick = {b: [arms[b][i] for i in brng.integers(0, len(arms[b]), len(arms[b]))] for b in (OFF, a)}
            q = {b: float(np.percentile(np.concatenate(x), 99)) for b, x in pick.items()}
            boot.append(q[a] / q[OFF])
        lo, hi = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
        c = counts[a]
        paired = _paired_ratio(windows, a, brng) if args.paired else None
        ratios[a] = {"p99_ratio": p99[a] / p99[OFF], "p99_ratio_ci95": [lo, hi],
                     "median_window_p99_ratio": float(np.median(per_window[a]) / np.median(per_window[OFF])),
                     "paired": paired,
                     "shadow_samples": c["samples"], "shadow_dropped": c["dropped"], "shadow_starved": c["starved"],
                     "shadow_mean_coverage": c["coverage_sum"] / c["samples"] if c["samples"] else None}
    return {"driver": "engine", "bundle": str(args.bundle), "k": args.k, "threads": threads, "capacity": cap,
            "offered_rps": rps, "rate": args.rate, "window_s": args.window_s, "warmup_s": args.warmup_s,
            "windows": windows,
            "arms": {a: {"requests": int(v.size), "p50_ms": float(np.percentile(v, 50)), "p99_ms": p99[a],
                         "mean_ms": float(v.mean()), "median_window_p99_ms": float(np.median(per_window[a]))}
                     for a, v in pooled.items()},
            "ratios": ratios}


def _paired_ratio(windows: list[dict[str, Any]], arm: str, rng: np.random.Generator) -> dict[str, Any] | None:
    """p99 of ``arm`` over p99 of off within each group (same arrivals, adjacent in time): the geometric
    mean and median of those ratios, and a bootstrap interval of the geometric mean over groups.

    A host stall lands in one window of one group and moves that group's ratio only, where it moves a
    pooled p99 for the whole arm; slow drift cancels inside a group. What it does not see: a monitor
    that itself caused rare stalls would show in the pooled ratio, which is why both are reported."""
    by: dict[int, dict[str, float]] = {}
    for w in windows:
        by.setdefault(int(w["group"]), {})[w["arm"]] = float(w["p99_ms"])
    logs = np.array([np.log(g[arm] / g[OFF]) for g in by.values() if arm in g and OFF in g and g[OFF] > 0])
    if logs.size == 0:
        return None
    boot = [float(np.exp(logs[rng.integers(0, logs.size, logs.size)].mean())) for _ in range(2000)]
    lo, hi = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
    return {"groups": int(logs.size), "geomean": float(np.exp(logs.mean())), "median": float(np.exp(np.median(logs))),
            "ci95": [lo, hi], "above_one": int((logs > 0).sum())}


def engine_table(r: dict[str, Any]) -> str:
    loads = [w["loadavg"] for w in r["windows"]]
    lines = [f"Engine driver: {r['threads']} scoring threads, k={r['k']}, closed-loop capacity {r['capacity']:.1f} answers/s, "
             f"offered {r['offered_rps']:.1f} req/s ({r['offered_rps'] / r['capacity']:.0%}), shadow rate {r['rate']} when on, "
             f"{len(r['windows'])} windows of {r['window_s']:.0f} s in the order A B (C) (C) B A ... after a "
             f"{r.get('warmup_s', 0):.0f} s warm-up window not counted; load average per window {min(loads):.1f}-{max(loads):.1f}.",
             "", "| monitor | windows | requests | p50 ms | p99 ms (pooled) | median of the windows' p99 ms | mean ms |",
             "|---|---|---|---|---|---|---|"]
    for a, v in r["arms"].items():
        n = sum(1 for w in r["windows"] if w.get("arm") == a)
        lines.append(f"| {a} | {n} | {v['requests']} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | {v['median_window_p99_ms']:.1f} | "
                     f"{v['mean_ms']:.1f} |")
    lines.append("")
    for a, x in r["ratios"].items():
        lo, hi = x["p99_ratio_ci95"]
        cov = x["shadow_mean_coverage"]
        lines.append(f"- monitor {a} / off: pooled p99 ratio **{x['p99_ratio']:.3f}** (95% bootstrap interval over windows "
                     f"{lo:.3f}-{hi:.3f}), ratio of the median window p99s {x['median_window_p99_ratio']:.3f}; "
                     f"{x['shadow_samples']} re-scorings, {x['shadow_dropped']} dropped ({x['shadow_starved']} finding no "
                     f"free CPU for 10 s, the rest on a full queue), mean coverage@{r['k']} "
                     f"{cov if cov is not None else float('nan'):.4f}.")
        pr = x.get("paired")
        if pr:
            plo, phi = pr["ci95"]
            lines.append(f"- monitor {a} / off, paired (same arrivals, adjacent windows): p99 ratio geometric mean "
                         f"**{pr['geomean']:.3f}** (95% bootstrap interval over {pr['groups']} groups {plo:.3f}-{phi:.3f}), "
                         f"median {pr['median']:.3f}, above 1 in {pr['above_one']} of {pr['groups']} groups.")
    return "\n".join(lines) + "\n"


def http_ab(args: argparse.Namespace) -> str:
    if args.rps is None:
        raise ValueError("--driver http needs --rps (about 70% of the service's capacity)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="shadow-") as tmp:
        for rnd in range(args.rounds):
            for rate in (0.0, args.rate) if rnd % 2 == 0 else (args.rate, 0.0):
                step = one_run(args.bundle, args.data, args.rps, args.seconds, rate, Path(tmp) / f"r{rnd}-{rate}")
                step["rate"], step["round"] = rate, rnd
                rows.append(step)
                print(f"round {rnd} rate {rate}: p50 {step['p50_ms']} ms, p99 {step['p99_ms']} ms, "
                      f"{step['requests']} requests, {step['failures']} failed, {step['shadow_samples']:.0f} shadow samples",
                      flush=True)
    lines = ["| round | shadow rate | offered req/s | requests | failed | p50 ms | p99 ms | server total ms | shadow samples | mean shadow coverage | dropped |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mean = r["shadow_coverage_sum"] / r["shadow_samples"] if r["shadow_samples"] else float("nan")
        lines.append(f"| {r['round']} | {r['rate']} | {r['offered_rps']} | {r['requests']} | {r['failures']} | {r['p50_ms']} | "
                     f"{r['p99_ms']} | {r['server_ms']['total_ms']:.1f} | {r['shadow_samples']:.0f} | {mean:.4f} | "
                     f"{r['shadow_dropped']:.0f} |")
    base = [r["p99_ms"] for r in rows if r["rate"] == 0.0]
    shad = [r["p99_ms"] for r in rows if r["rate"] != 0.0]
    ratio = (sum(shad) / len(shad)) / (sum(base) / len(base))
    lines += ["", f"p99 ratio (rate {args.rate} / rate 0, mean over rounds): {ratio:.3f}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Run it with nothing else of yours on the machine; it prints the load average per window.")
    ap.add_argument("--bundle", type=Path, required=True, help="a calibrated bundle (unimatch index build --data)")
    ap.add_argument("--data", type=Path, required=True, help="its dataset (held-out users are the queries)")
    ap.add_argument("--driver", choices=("engine", "http"), default="engine", help="in-process A/B windows, or two services")
    ap.add_argument("--rate", type=float, default=0.01, help="shadow rate compared with 0")
    ap.add_argument("--rps", type=float, default=None, help="offered load; engine default: 70%% of the measured capacity")
    ap.add_argument("--k", type=int, default=200, help="k of every request (engine driver; the http driver uses 200)")
    ap.add_argument("--users", type=int, default=300, help="held-out (user, domain) queries cycled through (engine driver)")
    ap.add_argument("--threads", type=int, default=None, help="scoring threads (engine driver; default: cores)")
    ap.add_argument("--capacity-s", type=float, default=10.0, help="closed-loop capacity measurement (engine driver)")
    ap.add_argument("--windows", type=int, default=16, help="alternating windows, ABBA order (engine driver)")
    ap.add_argument("--window-s", type=float, default=20.0, help="length of each window (engine driver)")
    ap.add_argument("--warmup-s", type=float, default=20.0, help="an uncounted window first (engine driver)")
    ap.add_argument("--no-paired", dest="paired", action="store_false",
                    help="draw every window's arrivals afresh (default: one draw per group of adjacent windows, one per arm)")
    ap.add_argument("--spare-cpus", type=int, default=1,
                    help="the monitor's UNIMATCH_SHADOW_SPARE_CPUS in the 'on' arm (default: the service's, 1)")
    ap.add_argument("--any-free-arm", action="store_true",
                    help="a third (or fourth) arm: the monitor yielding under the sixth session's rule, any free CPU (spare 0)")
    ap.add_argument("--no-yield-arm", action="store_true",
                    help="a third arm: the monitor on without yielding to requests (UNIMATCH_SHADOW_YIELD=false)")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each measured step (http driver)")
    ap.add_argument("--rounds", type=int, default=2, help="A/B rounds (http driver)")
    ap.add_argument("--md", type=Path, default=None, help="write the table here (markdown)")
    ap.add_argument("--json", type=Path, default=None, help="write every window here (engine driver)")
    args = ap.parse_args()
    for path, what in ((args.bundle / "manifest.json", "bundle"), (args.data / "dataset.json", "dataset")):
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent}: not a {what} (no {path.name})")
    if args.driver == "engine":
        result = engine_ab(args)
        text = engine_table(result)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    else:
        text = http_ab(args)
    print(text)
    if args.md:
        args.md.write_text(text)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as exc:  # a bad bundle or dataset (BundleError, BenchError): one line
        print(f"{Path(__file__).stem}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
