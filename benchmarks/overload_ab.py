"""Two versions of the service side by side under the same load: a 5 x burst, or a steady ~70%.

    python -m benchmarks.overload_ab --bundle B --data D --arm before=/path/to/old/tree --arm after=. \\
        --mode burst --rounds 3 [--env after:UNIMATCH_EDGE_SHED=false]

Each arm is a source tree (a `git worktree` or `git archive` of another commit) whose
``python -m unimatch.cli serve`` is started with that tree first on the path; the load is always this
tree's chaos generator (``loadtests/chaos.py``: open-loop Poisson, hand-written HTTP/1.1, drops instead
of queueing) against a private Redis, so only the service differs. Rounds alternate the arms to
cancel the drift of a shared machine. Per run it prints one line: the capacity measured just before
(closed loop, 3 s), what was sent, the answers by status, the server-side p50/p99 of the 200s
(the service's own ``stats.total_ms``), the share complete, and, over the slowest 1% of the 200s, the
service's own split of their time (an arm too old to report a stage shows 0 for it).

``--mode burst``: 5 x the capacity at ``--k`` for ``--seconds``, then 0.3 x the k=10 capacity for as long.
``--mode steady``: ``--fraction`` (0.7) x the capacity at ``--k`` for ``--seconds``; the 503s are
counted by reason from the service's metrics, before and after the phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def _shed(metrics_text: str) -> dict[str, float]:
    out = {}
    for line in metrics_text.splitlines():
        if line.startswith("unimatch_requests_shed_total{"):
            out[line.split("{", 1)[1].split("}", 1)[0]] = float(line.split()[-1])
    return out


async def one_run(args: argparse.Namespace, name: str, root: Path, env: dict[str, str]) -> str:
    import httpx

    from loadtests import chaos
    from service.features import load_features

    work = Path(tempfile.mkdtemp(prefix="overload-ab-"))
    redis = chaos.RedisProcess(work)
    redis.start()
    service = None
    cwd = os.getcwd()
    try:
        load_features(args.data, redis.url)
        users = [str(u) for u in np.load(args.data / "users/external_id.npy")[:2000].tolist()]
        domains = json.loads((args.bundle / "schema.json").read_text())["domains"]
        os.chdir(root)  # `python -m unimatch.cli` then imports this arm's tree first
        service = chaos.ServiceProcess(args.bundle, redis.url, work / "service.log",
                                       {"UNIMATCH_DEADLINE_MS": str(args.deadline_ms), "PYTHONPATH": str(root), **env})
        service.start()
        os.chdir(cwd)
        # k=10 first, as the chaos suite does: measured the other way round, the service before this
        # change never answered k=10 again (its k=10 estimate held one cold warm-up search and the edge
        # refused every request from then on: 0 answered in the burst, 2026-12-03)
        mu10 = await chaos.capacity(service.base, users, domains, 3.0, k=10) if args.mode == "burst" else 0.0
        mu = await chaos.capacity(service.base, users, domains, 3.0, k=args.k)
        if mu <= 0 or (args.mode == "burst" and mu10 <= 0):
            return (f"{name}: load avg {os.getloadavg()[0]:.1f}; no answer at all in a capacity run (k={args.k}: "
                    f"{mu:.0f}/s, k=10: {mu10:.0f}/s): the service refused everything before the burst")
        before = _shed(httpx.get(service.base + "/metrics").text)  # the capacity runs' refusals not counted
        if args.mode == "burst":
            phase = await chaos.open_loop(service.base, users, domains, rate=0, seconds=0, max_outstanding=400, segments=[
                chaos.Segment(args.seconds, 5 * mu, args.k), chaos.Segment(args.seconds, 0.3 * mu10, 10)])
            measured = chaos.Phase([a for a in phase.answers if a.sent < args.seconds], dropped=phase.dropped)
            offered = f"5 x {mu:.0f}/s at k={args.k}"
        else:
            measured = await chaos.open_loop(service.base, users, domains, rate=args.fraction * mu, seconds=args.seconds,
                                             k=args.k)
            offered = f"{args.fraction:g} x {mu:.0f}/s at k={args.k}"
        after_text = httpx.get(service.base + "/metrics").text
        after = _shed(after_text)
        headroom = next((line.split()[-1] for line in after_text.splitlines()
                         if line.startswith("unimatch_admission_headroom")), "-")
        ok = [a for a in measured.answers if a.status == 200]
        server = np.array([a.server_s * 1e3 for a in ok]) if ok else np.zeros(1)
        complete = sum(not a.partial and not a.short for a in ok)
        tail = chaos.tail_split(measured)
        split = " ".join(f"{key.removesuffix('_ms')} {tail[key]:.0f}" for key in chaos.STAGES)
        cut = partial_split(ok)
        reasons = {k.split('"')[1]: int(after[k] - before.get(k, 0)) for k in after if after[k] - before.get(k, 0)}
        return (f"{name}: load avg {os.getloadavg()[0]:.1f}; {offered}; sent {len(measured.answers)}, not sent "
                f"{measured.dropped}; 200 {len(ok)}, 503 {measured.shed} {reasons}, failed {measured.failed}; "
                f"complete {complete / max(1, len(ok)):.1%}; server p50/p99 {np.percentile(server, 50):.0f}/"
                f"{np.percentile(server, 99):.0f} ms; generator late p99 {measured.late_p99_ms():.0f} ms; "
                f"slowest 1%: {tail['total_ms']:.0f} ms = {split}; {cut}; headroom at the end {headroom}")
    finally:
        os.chdir(cwd)
        if service is not None:
            service.terminate()
            service.wait(15)
        redis.stop(save=False)


def partial_split(ok: list[Any]) -> str:
    """The partial answers among the 200s: how many had queued for a scoring thread (queue > 1 ms) and,
    over all of them, the service's own mean split of their time: where a cut answer's budget went."""
    cut = [a for a in ok if a.partial and a.stages]
    if not cut:
        return "partials: 0"
    queued = sum(a.stages.get("queue_ms", 0.0) > 1.0 for a in cut)
    split = " ".join(f"{key.removesuffix('_ms')} {np.mean([a.stages.get(key, 0.0) for a in cut]):.0f}"
                     for key in ("admitted_ms", "queue_ms", "search_ms", "runqueue_ms", "handoff_ms"))
    return f"partials: {len(cut)} ({queued} had queued), mean {split} ms"


def _arm(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not (Path(path) / "unimatch" / "cli.py").is_file():
        raise argparse.ArgumentTypeError(f"expected NAME=SOURCE_TREE (a tree with unimatch/cli.py), got {text!r}")
    return name, Path(path).resolve()


def _env(text: str) -> tuple[str, str, str]:
    name, sep, assignment = text.partition(":")
    key, eq, value = assignment.partition("=")
    if not sep or not eq or not key.startswith("UNIMATCH_"):
        raise argparse.ArgumentTypeError(f"expected ARM:UNIMATCH_NAME=VALUE, got {text!r}")
    return name, key, value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--arm", type=_arm, action="append", required=True, metavar="NAME=TREE",
                   help="a source tree to serve from (give two or more)")
    p.add_argument("--env", type=_env, action="append", default=[], metavar="ARM:UNIMATCH_X=V",
                   help="an extra setting for one arm (the same tree twice with a setting on and off)")
    p.add_argument("--mode", choices=("burst", "steady"), default="burst")
    p.add_argument("--k", type=int, default=500, help="k of the measured load (burst default 500; steady: try 200)")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--fraction", type=float, default=0.7, help="steady mode: the share of the measured capacity")
    p.add_argument("--deadline-ms", type=float, default=100.0)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    from loadtests.inputs import check_bundle_and_data

    try:
        check_bundle_and_data(args.bundle, args.data, require_graph=True)
    except ValueError as exc:
        print(f"overload_ab: error: {exc}", file=sys.stderr)
        return 2
    envs: dict[str, dict[str, str]] = {}
    for arm, key, value in args.env:
        envs.setdefault(arm, {})[key] = value
    for r in range(args.rounds):
        for name, root in args.arm:
            line: Any = asyncio.run(one_run(args, f"round {r + 1} {name}", root, envs.get(name, {})))
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
