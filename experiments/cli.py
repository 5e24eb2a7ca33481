"""`unimatch experiment ...`: run a table's grid resumably, and render its tables and plots."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, get_args

from unimatch.cli import CommandRegistry

GROUP_HELP = "reproduce the paper's comparison (Table III) and ablation (Table IV) on public data"


def register(cli: CommandRegistry) -> None:
    from experiments.config import BackendName

    p = cli.group_command(
        "experiment",
        "run",
        help="run (or resume) every missing run of an experiment config",
        description="Prepare the config's datasets, choose each method's learning rate on the validation "
        "split (same grid for all), train and evaluate every (dataset, method, seed) that has no result "
        "file yet, then render the tables and plots. Finished runs are skipped, so rerunning resumes.",
        handler=_run,
        group_help=GROUP_HELP,
    )
    p.add_argument("--config", type=Path, required=True, help="experiment config (experiments/configs/*.json)")
    p.add_argument("--out", type=Path, required=True, help="experiment directory (results, runs, tables, plots)")
    p.add_argument("--data-root", type=Path, default=None, help="where datasets are prepared (default OUT/data)")
    p.add_argument("--hours", type=float, default=None, help="start no new run after this many hours")
    p.add_argument("--dataset", action="append", default=None, help="only this dataset (repeatable)")
    p.add_argument("--method", action="append", default=None, help="only this method (repeatable)")
    p.add_argument("--seed", action="append", type=int, default=None, help="only this seed (repeatable)")
    p.add_argument("--backend", choices=list(get_args(BackendName)), default=None, help="override the config's backend")
    p.add_argument("--keep-going", action="store_true", help="log a failed run and go on with the others")
    p.add_argument("--plan", action="store_true", help="only print the run counts and measured cost, run nothing")
    p.add_argument("--no-render", action="store_true", help="do not render tables and plots at the end")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="run the grid as this many processes, the methods split between them by measured cost (each "
        "process trains on one thread: use about one per core); logs in OUT/logs/worker-<i>.log",
    )

    p = cli.group_command(
        "experiment",
        "render",
        help="render an experiment directory's results as markdown tables, results.json and PNG plots",
        handler=_render,
        group_help=GROUP_HELP,
    )
    p.add_argument("--out", type=Path, required=True, help="experiment directory written by `experiment run`")
    p.add_argument("--config", type=Path, default=None, help="config to render with (default OUT/experiment.json)")


def _run(args: argparse.Namespace) -> int:
    from experiments.backends import make_backend
    from experiments.config import load_config
    from experiments.render import render
    from experiments.runner import plan, run_experiment

    cfg = load_config(args.config)
    if args.hours is not None and args.hours <= 0:
        raise ValueError(f"--hours must be > 0, got {args.hours}")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.plan:
        print(json.dumps(plan(cfg, args.out), indent=2))
        return 0
    backend = make_backend(args.backend or cfg.backend)
    deadline = None if args.hours is None else time.time() + args.hours * 3600
    if args.workers > 1:
        return _run_parallel(args, cfg, backend, deadline)
    report = run_experiment(
        cfg,
        args.out,
        backend=backend,
        data_root=args.data_root,
        deadline=deadline,
        only_datasets=args.dataset,
        only_methods=args.method,
        only_seeds=args.seed,
        keep_going=args.keep_going,
    )
    print(
        f"{cfg.name}: {report.done} runs done, {report.skipped} already finished, {report.pending} pending, "
        f"{len(report.failed)} failed in {report.seconds:.0f} s"
    )
    for line in report.failed:
        print(f"  failed: {line}")
    if not args.no_render:
        for what, path in render(args.out, cfg=cfg).items():
            print(f"  {what}: {path}")
    return 1 if report.failed else 0


def _run_parallel(args: argparse.Namespace, cfg: Any, backend: Any, deadline: float | None) -> int:
    from experiments.parallel import partition_methods, run_workers
    from experiments.render import render
    from experiments.runner import prepare_dataset, save_config

    for name in (args.dataset or []) + (args.method or []):
        if name not in [d.name for d in cfg.datasets] + cfg.methods:
            raise ValueError(f"{name!r} is neither a dataset nor a method of {cfg.name}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    data_root: Path = args.data_root if args.data_root is not None else out / "data"
    # Prepared here, once, so that the workers never import or generate the same dataset at once.
    for ds in cfg.datasets:
        if not args.dataset or ds.name in args.dataset:
            prepare_dataset(cfg, ds, backend=backend, data_root=data_root)
    methods = [m for m in cfg.methods if not args.method or m in args.method]
    groups = partition_methods(methods, args.workers)
    base = ["experiment", "run", "--config", str(args.config), "--out", str(out), "--data-root", str(data_root)]
    base.append("--no-render")
    for name in args.dataset or []:
        base += ["--dataset", name]
    for seed in args.seed or []:
        base += ["--seed", str(seed)]
    if args.backend:
        base += ["--backend", args.backend]
    if args.keep_going:
        base.append("--keep-going")
    if deadline is not None:
        left_h = (deadline - time.time()) / 3600
        if left_h <= 0:
            print(f"{cfg.name}: --hours ran out while preparing the datasets; no run started")
            return 0
        base += ["--hours", f"{left_h:.6f}"]
    for i, group in enumerate(groups):
        print(f"worker {i}: {', '.join(group)} (log: {out / 'logs' / f'worker-{i}.log'})")
    t0 = time.perf_counter()
    results = run_workers(base, groups, out / "logs")
    failed = [r for r in results if r.returncode != 0]
    print(f"{cfg.name}: {len(results)} workers finished in {time.perf_counter() - t0:.0f} s, {len(failed)} failed")
    for r in failed:
        print(f"  failed: worker with {', '.join(r.methods)} exited {r.returncode}; see {r.log}")
    if not args.no_render:
        for what, path in render(out, cfg=cfg).items():
            print(f"  {what}: {path}")
    return 1 if failed else 0


def _render(args: argparse.Namespace) -> int:
    from experiments.config import load_config
    from experiments.render import render

    cfg = load_config(args.config) if args.config is not None else None
    if not args.out.is_dir():
        raise FileNotFoundError(f"{args.out} is not an experiment directory")
    for what, path in render(args.out, cfg=cfg).items():
        print(f"{what}: {path}")
    return 0
