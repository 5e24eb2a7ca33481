"""`unimatch bench search`: coverage, recall, share scored and latency of the NANN search (thin CLI)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from unimatch.cli import CommandRegistry, int_list


def _ints(text: str) -> tuple[int, ...]:
    return int_list(text)


def _labelled(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=BUNDLE, got {text!r}")
    return label, Path(path)


def register(cli: CommandRegistry) -> None:
    p = cli.group_command(
        "bench",
        "search",
        help="coverage, recall, share scored and latency of the graph search vs exhaustive and two-tower",
        description="Benchmark the NANN beam search of a bundle on held-out users of a dataset: coverage@k "
        "against exhaustive scoring with the same model, Recall-all@k and Recall-retrieval@k (paper Eqs. 26-27), "
        "pair evaluations, latency p50/p99, scorer time share, speed-up over exhaustive, a two-tower baseline, "
        "and an ef/T sweep plot. Writes JSON, markdown and PNG.",
        handler=_search,
        group_help="benchmarks of the retrieval engine",
    )
    p.add_argument("--bundle", type=Path, required=True, help="bundle with a graph (`unimatch index build`)")
    p.add_argument("--data", type=Path, required=True, help="the dataset the bundle was trained on")
    p.add_argument("--users", type=int, default=2000, help="held-out (user, domain) queries")
    p.add_argument("--k", type=_ints, default=None,
                   help="comma-separated k values (default 50,200,1000, capped at the smallest domain's entities)")
    p.add_argument("--json", type=Path, default=None, help="write the results JSON here")
    p.add_argument("--md", type=Path, default=None, help="write the markdown report here")
    p.add_argument("--plot", type=Path, default=None, help="write the coverage-vs-scored PNG here")
    p.add_argument("--two-tower", type=Path, default=None, help="two-tower bundle for the baseline column")
    p.add_argument("--ef", type=_ints, default=None, help="per-layer ef, top layer first (default: engine's)")
    p.add_argument("--steps", type=_ints, default=None, help="per-layer T, top layer first")
    p.add_argument("--top-n", type=_ints, default=None, help="per-layer top-n kept for the merge")
    p.add_argument("--max-degree", type=_ints, default=None,
                   help="per-layer cap on the neighbours expanded per node, 0 = all (default: no cap)")
    p.add_argument("--whole-top-layer-up-to", type=int, default=None,
                   help="score the whole top layer as the entry set when it has at most this many nodes "
                        "(default: the engine's, 4096)")
    p.add_argument("--no-sweep", action="store_true", help="skip the ef/T sweep")
    p.add_argument("--sweep-users", type=int, default=200, help="queries per sweep point")
    p.add_argument("--sweep-k", type=int, default=200, help="k of the sweep")
    p.add_argument("--sweep-bundle", type=_labelled, action="append", default=[], metavar="LABEL=BUNDLE",
                   help="another bundle drawn in the sweep (e.g. trained without the adversarial loss)")
    p.add_argument("--threads", type=int, default=0, help="worker threads of the throughput run (0 = CPUs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the query sample")


def _command_line(args: argparse.Namespace) -> str:
    """The canonical command that reproduces this run (recorded in the markdown report)."""
    parts = ["unimatch", "bench", "search", "--bundle", str(args.bundle), "--data", str(args.data),
             "--users", str(args.users), "--k", ",".join(map(str, args.k))]
    for flag, value in (("--two-tower", args.two_tower), ("--json", args.json), ("--md", args.md), ("--plot", args.plot)):
        if value is not None:
            parts += [flag, str(value)]
    for flag, value in (("--ef", args.ef), ("--steps", args.steps), ("--top-n", args.top_n),
                        ("--max-degree", args.max_degree)):
        if value is not None:
            parts += [flag, ",".join(map(str, value))]
    if args.whole_top_layer_up_to is not None:
        parts += ["--whole-top-layer-up-to", str(args.whole_top_layer_up_to)]
    if args.no_sweep:
        parts.append("--no-sweep")
    else:
        parts += ["--sweep-users", str(args.sweep_users), "--sweep-k", str(args.sweep_k)]
        for label, path in args.sweep_bundle:
            parts += ["--sweep-bundle", f"{label}={path}"]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    if args.seed:
        parts += ["--seed", str(args.seed)]
    return " ".join(shlex.quote(p) for p in parts)


def _search(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from rich.console import Console
    from rich.table import Table

    from service.bench.search_bench import BenchConfig, run_search_bench, write_outputs
    from service.engine import SearchParams

    if args.users <= 0:
        raise ValueError(f"--users must be positive, got {args.users}")
    # No search flag: the bundle's calibration (what the service serves), else the engine defaults.
    explicit = any(v is not None for v in (args.ef, args.steps, args.top_n, args.max_degree, args.whole_top_layer_up_to))
    params = SearchParams()
    if args.ef is not None:
        params = replace(params, ef=args.ef)
    if args.steps is not None:
        params = replace(params, steps=args.steps)
    if args.top_n is not None:
        params = replace(params, top_n=args.top_n)
    if args.max_degree is not None:
        params = replace(params, max_degree=args.max_degree)
    if args.whole_top_layer_up_to is not None:
        params = replace(params, whole_top_layer_up_to=args.whole_top_layer_up_to)
    cfg = BenchConfig(
        bundle=args.bundle, data=args.data, users=args.users, ks=args.k or (50, 200, 1000), cap_ks=args.k is None,
        params=params if explicit else None, two_tower=args.two_tower,
        sweep=not args.no_sweep, sweep_k=args.sweep_k, sweep_users=args.sweep_users,
        sweep_bundles=tuple(args.sweep_bundle), throughput_threads=args.threads, seed=args.seed,
    )
    from unimatch.progress import working

    console = Console(stderr=True)
    with working("bench search", console=console):  # its own lines per pass, and a heartbeat between them off a terminal
        res = run_search_bench(cfg, log=lambda m: console.print(m))
    table = Table(title=f"bench search: {res['catalogue_size']:,} entities, {res['queries']} queries")
    for col in ("k", "coverage", "recall-all/query", "recall-retr.", "two-tower r.-retr.", "scored", "p50 ms", "p99 ms", "scorer share", "speed-up"):
        table.add_column(col, justify="right")
    for k, r in res["k"].items():
        tt = res["two_tower"].get(k, {}).get("recall_retrieval")
        table.add_row(k, f"{r['coverage']:.4f}", f"{r['recall_all']:.4f}", f"{r['recall_retrieval']:.4f}",
                      "—" if tt is None else f"{tt:.4f}", f"{r['scored_fraction']:.2%}", f"{r['latency_ms_p50']:.2f}",
                      f"{r['latency_ms_p99']:.2f}", f"{r['scorer_time_share']:.1%}", f"{r['speedup_vs_exhaustive']:.1f}x")
    Console().print(table)
    Console().print(f"exhaustive p50 {res['exhaustive']['latency_ms_p50']:.2f} ms; "
                    f"throughput {res['throughput']['qps']:.1f} q/s ({res['throughput']['threads']} threads)")
    args.k = tuple(int(k) for k in res["k"])  # the k values run (the default may have been capped)
    command = _command_line(args)
    write_outputs(res, json_path=args.json, md_path=args.md, plot_path=args.plot, command=command)
    return 0
