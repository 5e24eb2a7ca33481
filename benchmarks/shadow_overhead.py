"""Does the live coverage monitor cost live requests anything? p99 at a fixed load, shadow rate 0 vs R.

Starts `unimatch serve` on loopback twice per round (UNIMATCH_SHADOW_RATE=0, then =R), each time runs
one open-loop Locust step of `unimatch loadtest` at the same offered rate, and compares the client p99
(and p50, server total) side by side; rounds alternate A/B to cancel machine drift. Bounded: every run
stops by itself.

    python -m benchmarks.shadow_overhead --bundle B --data D --rps 60 --rate 0.01 --rounds 2 --md docs/x.md
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--rps", type=float, required=True, help="offered load (about 70%% of the service's capacity)")
    ap.add_argument("--rate", type=float, default=0.01, help="shadow rate compared with 0")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each measured step")
    ap.add_argument("--rounds", type=int, default=2, help="A/B rounds")
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args()
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
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        args.md.write_text(text)


if __name__ == "__main__":
    main()
