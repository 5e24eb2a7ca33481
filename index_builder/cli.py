"""`unimatch index build`: the 4-layer HNSW graph of a bundle (paper section IV-B), thin layer over build_index."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from unimatch.cli import CommandRegistry, int_list

GROUP_HELP = "build the HNSW graph the service searches"


def register(cli: CommandRegistry) -> None:
    from index_builder.config import IndexConfig  # stdlib-only module: cheap

    d = IndexConfig()
    p = cli.group_command(
        "index",
        "build",
        help="build the HNSW graph over the bundle's entity vectors and write it into the bundle",
        description="Build an HNSW graph with exactly --layers layers (L2 over entities/vectors.npy) with "
        "hnswlib, repair reachability, extract per-layer CSR arrays into BUNDLE/graph/, print and save the "
        "health report (BUNDLE/graph_health.json) and add the 'graph' section to manifest.json.",
        handler=_build,
        group_help=GROUP_HELP,
    )
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory written by `unimatch export`")
    p.add_argument("--layers", type=int, default=d.layers, help="number of HNSW layers (levels 0..layers-1)")
    p.add_argument("--M", dest="M", type=int, default=d.M, help="max out-degree on upper layers (2M on layer 0)")
    p.add_argument("--ef-construction", type=int, default=d.ef_construction, help="candidate list size at insertion")
    p.add_argument(
        "--threads", type=int, default=d.threads, help="insertion threads, 0 = all cores (>1 is not reproducible)"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the insertion order and the health queries")
    p.add_argument("--health-queries", type=int, default=d.health_queries, help="queries for the recall check")
    p.add_argument("--health-ef", type=int, default=d.health_ef, help="search list size ef for the recall check")
    p.add_argument("--json", type=Path, default=None, help="also write the health report to this file")
    p.add_argument(
        "--no-sort-neighbours", dest="sort_neighbours", action="store_false",
        help="keep hnswlib's neighbour order instead of nearest first (a search degree cap then keeps arbitrary edges)",
    )
    p.add_argument("--data", type=Path, default=None,
                   help="the dataset the bundle was trained on: calibrate the search on its validation users after "
                        "the build (same as `unimatch index calibrate`; without it the bundle serves the default "
                        "search point, uncalibrated)")
    _calibration_args(p)
    c = cli.group_command(
        "index",
        "calibrate",
        help="measure per domain and k the cheapest search point that finds the model's own top-k",
        description="On held-out (user, domain) queries of the validation split, score every query exhaustively, "
        "then search a grid of operating points (bottom-layer ef as a multiple of k, upper-layer ef, bottom T, "
        "seeding the beam with the user's history) and store per domain and k bucket the cheapest point whose "
        "mean coverage@k reaches --target, or exhaustive mode where the graph cannot do it faster than scoring "
        "the domain whole. Written into the bundle (calibration.json, checksummed in manifest.json); the "
        "service uses it unless UNIMATCH_SEARCH_* are set.",
        handler=_calibrate,
        group_help=GROUP_HELP,
    )
    c.add_argument("--bundle", type=Path, required=True, help="bundle with a graph (`unimatch index build`)")
    c.add_argument("--data", type=Path, required=True, help="the dataset the bundle was trained on")
    _calibration_args(c)
    k = cli.group_command(
        "index",
        "compact",
        help="fold the live change log into a new bundle version (rows added online, paused/deleted state, graph)",
        description="Replay the bundle lineage's change log (the Redis stream the service's /admin/entities* "
        "write) with the service's own apply code, and write the result to --out as a new bundle version: "
        "base rows in place, online rows appended, entities/status.npy for paused and dead rows, the live "
        "graph overlay frozen into the CSR arrays, the log position in manifest.live. A service serving the "
        "new version replays only the entries after that position (docs/live-catalogue.md).",
        handler=_compact,
        group_help=GROUP_HELP,
    )
    k.add_argument("--bundle", type=Path, required=True, help="the bundle being served (never modified)")
    k.add_argument("--out", type=Path, required=True, help="directory of the new bundle version")
    k.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis holding the change log")
    k.add_argument("--redis-key-prefix", default="unimatch", help="UNIMATCH_REDIS_KEY_PREFIX of the service")
    k.add_argument("--until", default=None, help="last log position to fold in (default: the end of the log)")


def _calibration_args(p: argparse.ArgumentParser) -> None:
    from service.calibration import CalibrateConfig  # numpy + json only: cheap at start-up

    d = CalibrateConfig()
    p.add_argument("--target", type=float, default=d.target, help="mean coverage@k of the model's own top-k to reach")
    p.add_argument("--queries", type=int, default=d.queries,
                   help="held-out (user, domain) queries in all, split evenly over domains (all if fewer)")
    p.add_argument("--k", dest="ks", type=_ints, default=d.ks,
                   help="comma-separated k buckets; a request uses the smallest bucket >= its k")
    p.add_argument("--max-exhaustive-pairs", type=float, default=d.max_exhaustive_pairs,
                   help="bound on the exhaustive reference's pair evaluations (caps queries on large catalogues)")
    p.add_argument("--calibration-json", type=Path, default=None, help="also write the calibration to this file")


def _check_json_out(out: Path | None) -> None:
    """Refuse an unwritable --calibration-json before minutes of building and calibrating, not after."""
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise ValueError(f"--calibration-json {out}: {'is a directory' if out.is_dir() else 'its folder does not exist'}")


def _ints(text: str) -> tuple[int, ...]:
    return int_list(text, positive=True)


def _run_calibration(args: argparse.Namespace, console: Any) -> int:
    """Calibrate ``args.bundle`` on ``args.data``, print the table; 0 when every domain was calibrated."""
    from model.data.io import atomic_write_json
    from service.calibrate import calibrate_bundle
    from service.calibration import CalibrateConfig

    cfg = CalibrateConfig(target=args.target, queries=args.queries, ks=args.ks,
                          max_exhaustive_pairs=args.max_exhaustive_pairs)
    _check_json_out(args.calibration_json)
    with _progress(console) as progress:
        cal = calibrate_bundle(args.bundle, args.data, cfg, progress=progress, log=lambda m: console.print(m))
    print_calibration(cal, console)
    if args.calibration_json is not None:
        atomic_write_json(args.calibration_json, cal.to_json())
    console.print(f"wrote {args.bundle}/calibration.json ({cal.seconds:.0f} s); manifest updated")
    return 0


def _console() -> Any:
    import sys

    from rich.console import Console

    # Off a terminal rich assumes 80 columns and folds the tables into unreadable cells: log lines are wide.
    return Console(width=None if sys.stdout.isatty() else 200)


def _calibrate(args: argparse.Namespace) -> int:
    return _run_calibration(args, _console())


def print_calibration(cal: Any, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"search calibration: target coverage {cal.target}, {cal.queries} {cal.split} queries")
    for col in ("domain", "k", "mode", "coverage ± 95% CI", "pairs", "share of exhaustive", "p50 ms",
                "exhaustive p50 ms", "ef (top first)", "T", "history seeds"):
        table.add_column(col, justify="right")
    for name, points in cal.domains.items():
        for p in points:
            table.add_row(
                name, str(p.k), p.mode, f"{p.coverage:.4f} ± {p.coverage_ci95:.4f}", f"{p.pairs:,.0f}",
                f"{p.pairs / p.exhaustive_pairs:.1%}", f"{p.latency_ms_p50:.2f}", f"{p.exhaustive_ms_p50:.2f}",
                "/".join(map(str, p.ef)) if p.mode == "graph" else "-",
                "/".join(map(str, p.steps)) if p.mode == "graph" else "-",
                ("yes" if p.seed_history else "no") if p.mode == "graph" else "-",
            )
    console.print(table)


class _LineProgress:
    """Progress as log lines when stderr is not a terminal: one line every ``every_s`` seconds."""

    def __init__(self, console: Any, every_s: float = 10.0) -> None:
        import time

        self.console, self.every_s, self._time = console, every_s, time.monotonic
        self._last = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self._time()
        if now - self._last >= self.every_s or (total and done == total):
            self._last = now
            self.console.print(f"{stage}: {done:,}" + (f"/{total:,}" if total else ""))


def _progress(console: Any) -> Any:
    """A context manager yielding a ``(stage, done, total)`` callback: a bar on a terminal, else log lines."""
    import contextlib
    import sys

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not sys.stderr.isatty() or not console.is_terminal:
        return contextlib.nullcontext(_LineProgress(console))

    @contextlib.contextmanager
    def bar_ctx() -> Any:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("calibrating", total=None)
            yield lambda stage, done, total: bar.update(task, description=stage, completed=done, total=total or None)

    return bar_ctx()


def _build(args: argparse.Namespace) -> int:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from index_builder.build import build_index
    from index_builder.config import IndexConfig
    from model.data.io import atomic_write_json

    _check_json_out(args.calibration_json)
    cfg = IndexConfig(
        layers=args.layers,
        M=args.M,
        ef_construction=args.ef_construction,
        threads=args.threads,
        seed=args.seed,
        health_queries=args.health_queries,
        health_ef=args.health_ef,
        sort_neighbours=args.sort_neighbours,
    )
    console = _console()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("inserting vectors", total=None)

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(task, description=stage, completed=done, total=total or None)

        report = build_index(bundle=args.bundle, cfg=cfg, progress=progress)
    print_report(report, console)
    if args.json is not None:
        atomic_write_json(args.json, report)
    console.print(f"wrote {args.bundle}/graph/ and {args.bundle}/graph_health.json; manifest updated")
    healthy = report["all_reachable"] and report["nested"] and report["entry_points_on_top_layer"]
    if args.data is None:
        console.print("search not calibrated: the service will use the default search point; run "
                      f"`unimatch index calibrate --bundle {args.bundle} --data DATASET` to measure this catalogue's")
        return 0 if healthy else 1
    rc = _run_calibration(args, console)
    return rc if healthy else 1


def _compact(args: argparse.Namespace) -> int:
    from service.compact import compact

    console = _console()
    report = compact(bundle=args.bundle, out=args.out, redis_url=args.redis_url, prefix=args.redis_key_prefix,
                     until=args.until)
    console.print(
        f"wrote {args.out}: bundle {report['bundle_version']}, {report['num_entities']:,} entities "
        f"({report['rows_added']:,} added online, {report['paused']:,} paused, {report['dead']:,} dead), "
        f"log {report['lineage']} folded up to {report['position']} ({report['entries']:,} entries)"
    )
    return 0


def print_report(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    table = Table(
        title=f"HNSW graph health: {report['num_nodes']:,} nodes x {report['dim']} dims, {report['layers']} layers"
    )
    for col in (
        "layer",
        "nodes",
        "edges",
        "deg min/mean/p99/max",
        "unreachable before repair",
        "repair edges",
        "reachable",
    ):
        table.add_column(col, justify="right")
    rep = report["repair"]
    for row in reversed(report["per_layer"]):
        layer = row["layer"]
        deg = row["degree"]
        table.add_row(
            str(layer),
            f"{row['nodes']:,}",
            f"{row['edges']:,}",
            f"{deg['min']}/{deg['mean']:.1f}/{deg['p99']}/{deg['max']}",
            "-" if rep["unreachable_before"] is None else f"{rep['unreachable_before'][layer]:,}",
            "-" if rep["edges_added"] is None else f"{rep['edges_added'][layer]:,}",
            f"{row['reachable']:,}/{row['nodes']:,}",
        )
    console.print(table)
    ok = "yes" if report["nested"] else "NO"
    ep = "yes" if report["entry_points_on_top_layer"] else "NO"
    console.print(
        f"nested layers: {ok}; entry point(s) {report['entry_points']} on top layer: {ep}; "
        f"levels before capping: {report['levels_before_capping']} "
        f"({report['nodes_capped_into_top_layer']} nodes capped into layer {report['layers'] - 1})"
    )
    if "l2_recall" in report:
        console.print(
            f"L2 recall@{report['k']} (ef={report['ef']}, {report['queries']} queries): extracted graph "
            f"{report['l2_recall']:.4f}, hnswlib knn_query {report.get('library_l2_recall', float('nan')):.4f}, "
            f"overlap {report.get('overlap_with_library', float('nan')):.4f}"
        )
    console.print("timings (s): " + ", ".join(f"{k} {v}" for k, v in report["timings_s"].items()))
