"""Spread one experiment over several worker processes, one set of methods each.

Training here is single-threaded by design (``train.threads: 1`` in the configs: a torch step on a
batch of 128 gains little from a second thread), so on a machine with W cores the grid runs W times
faster as W processes. The split is by method, because a method's runs depend on each other (its
learning rate is chosen before its final seeds run) while different methods never share a file;
every worker is the ordinary ``unimatch experiment run`` restricted with ``--method``, so the result
files are exactly those of one sequential call and a stopped parallel run resumes either way.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Relative wall time of a method's share of one table (its 3 tuning runs and 3 test runs, training
# plus evaluation, as a worker spends it; DNN = 1, 551 s): measured on the tuned grid on amazon
# sport/cloth (400 steps, batch 128, the configs' narrowed network, one thread, 500 evaluation users,
# two workers side by side; result files in docs/results/exp-tuned). Evaluation is half of that time
# or more there and costs more for the mixture models, which is why MMoE, DSelect-k and PLE weigh
# more than their training alone. Only used to balance the workers: a wrong guess costs idle time, never a
# different result.
METHOD_COST: dict[str, float] = {
    "dnn": 1.0,
    "shared-bottom": 1.0,
    "cross-stitch": 1.8,
    "mmoe": 2.3,
    "dselect-k": 2.4,
    "ple": 2.6,
    "backbone": 1.6,
    "backbone-dal": 1.6,
    "backbone-dal-uwl": 1.7,
    "backbone-mvwdl": 1.6,
    "backbone-rrl": 1.5,
    "backbone-rrl-adv": 2.3,
}
DEFAULT_COST = 2.0


def partition_methods(methods: Sequence[str], workers: int) -> list[list[str]]:
    """Split ``methods`` into at most ``workers`` groups of similar total cost (longest first, each
    to the least loaded group); every group keeps the config's method order."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    groups: list[list[str]] = [[] for _ in range(min(workers, len(methods)))]
    load = [0.0] * len(groups)
    for method in sorted(methods, key=lambda m: -METHOD_COST.get(m, DEFAULT_COST)):
        i = min(range(len(groups)), key=lambda g: (load[g], g))
        groups[i].append(method)
        load[i] += METHOD_COST.get(method, DEFAULT_COST)
    order = {m: k for k, m in enumerate(methods)}
    return [sorted(g, key=order.__getitem__) for g in groups if g]


@dataclass(frozen=True)
class WorkerResult:
    methods: tuple[str, ...]
    returncode: int
    log: Path


def run_workers(base_argv: Sequence[str], groups: Sequence[Sequence[str]], log_dir: Path) -> list[WorkerResult]:
    """Run ``unimatch <base_argv> --method m ...`` once per group, all at once; wait for all.

    Each worker's output goes to ``log_dir/worker-<i>.log`` (a line per run, as a sequential call
    prints it). Interrupting the parent stops every worker; their finished runs stay on disk.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[tuple[subprocess.Popen[bytes], tuple[str, ...], Path]] = []
    try:
        for i, group in enumerate(groups):
            log = log_dir / f"worker-{i}.log"
            argv = [sys.executable, "-m", "unimatch.cli", *base_argv]
            for method in group:
                argv += ["--method", method]
            with log.open("ab") as fh:
                fh.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv[1:])}\n".encode())
                fh.flush()
                procs.append((subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT), tuple(group), log))
        return [WorkerResult(methods, proc.wait(), log) for proc, methods, log in procs]
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc, _, _ in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
