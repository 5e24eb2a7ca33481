"""`unimatch index build`: the 4-layer HNSW graph of a bundle (paper section IV-B), thin layer over build_index."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from unimatch.cli import CliError, CommandRegistry, check_out_file, int_list, wide_console

GROUP_HELP = "the search graph of a bundle: build it (HNSW), calibrate the search on it, compact live changes into it"


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
    p.add_argument("--space", choices=("vectors", "scores", "auto"), default="vectors",
                   help="what the graph's L2 is over: the exported entity vectors, or those beside each entity's "
                        "scores for --probe-users training users (`unimatch index score-space`, needs --data): "
                        "neighbours the model scores alike; no live insertions on such a graph. auto (needs "
                        "--data): build and calibrate both, keep the one that scores fewer pairs (twice the time)")
    p.add_argument("--probe-users", type=int, default=None,
                   help="with --space scores or auto: probe users (default 128)")
    p.add_argument("--data", type=Path, default=None,
                   help="the dataset the bundle was trained on: calibrate the search on its validation users after "
                        "the build (same as `unimatch index calibrate`; without it the bundle serves the default "
                        "search point, uncalibrated)")
    # The calibration's own flags, passed on to `unimatch index calibrate` when given (its --help has the
    # defaults): the build stays free of the service, which the calibration runs.
    for flag, kind, what in (("--target", float, "mean coverage@k to reach"),
                             ("--queries", int, "held-out (user, domain) queries in all"),
                             ("--k", _k_buckets, "comma-separated k buckets"),
                             ("--max-exhaustive-pairs", float, "bound on the exhaustive reference's pairs"),
                             ("--calibration-json", Path, "also write the calibration to this file")):
        p.add_argument(flag, type=kind, default=None, help=f"with --data: {what} (as `unimatch index calibrate`)")


def _k_buckets(text: str) -> str:
    """``--k`` checked now (not after minutes of building), passed on as the user wrote it."""
    int_list(text, positive=True)
    return text


def _build(args: argparse.Namespace) -> int:
    from contracts.io import atomic_write_json
    from index_builder.build import build_index
    from index_builder.config import IndexConfig

    check_out_file(args.calibration_json, "--calibration-json")
    if args.space in ("scores", "auto") and args.data is None:
        raise CliError(f"--space {args.space} needs --data (the probe users come from its training split)")
    if args.probe_users is not None and args.space == "vectors":
        raise CliError("--probe-users is for --space scores or auto")
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
    from unimatch.progress import progress as progress_of

    console = wide_console()
    if args.space == "auto":
        return _build_auto(args, cfg, console)
    if args.space == "scores":
        rc = _score_space_first(args, args.bundle)
        if rc != 0:
            return rc
    with progress_of("index build") as update:

        def progress(stage: str, done: int, total: int) -> None:
            update(done, total or None, stage=stage)

        report = build_index(bundle=args.bundle, cfg=cfg, progress=progress, space=args.space)
    print_report(report, console)
    if args.json is not None:
        atomic_write_json(args.json, report)
    console.print(f"wrote {args.bundle}/graph/ and {args.bundle}/graph_health.json; manifest updated")
    healthy = report["all_reachable"] and report["nested"] and report["entry_points_on_top_layer"]
    if args.data is None:
        console.print("search not calibrated: the service will use the default search point; run "
                      f"`unimatch index calibrate --bundle {args.bundle} --data DATASET` to measure this catalogue's")
        return 0 if healthy else 1
    rc = _calibrate_after_build(args, args.bundle)
    return rc if healthy else 1


def _build_one(bundle: Path, cfg: Any, space: str, console: Any) -> bool:
    """Build the graph of ``bundle`` over ``space``, print its health; True when it is healthy."""
    from index_builder.build import build_index
    from unimatch.progress import progress as progress_of

    with progress_of(f"index build ({space})") as update:
        report = build_index(bundle=bundle, cfg=cfg, space=space,
                             progress=lambda stage, done, total: update(done, total or None, stage=stage))
    print_report(report, console)
    return bool(report["all_reachable"] and report["nested"] and report["entry_points_on_top_layer"])


def _build_auto(args: argparse.Namespace, cfg: Any, console: Any) -> int:
    """--space auto: the vector-space graph built and calibrated in the bundle, the score-space one in a
    hard-linked copy beside it; the one whose calibrated points score fewer pairs ends up in the bundle."""
    from contracts.calibration import CALIBRATION_FILE, load_calibration
    from contracts.io import atomic_write_json
    from index_builder.space_choice import adopt, choose_space, link_copy, remove_copy

    healthy = _build_one(args.bundle, cfg, "vectors", console)
    rc = _calibrate_after_build(args, args.bundle, write_json=False)
    if rc != 0:
        return rc
    copy = link_copy(args.bundle)
    try:
        console.print(f"--space auto: the score-space graph is built in {copy} (hard links) to compare")
        rc = _score_space_first(args, copy)
        if rc != 0:
            return rc
        healthy_scores = _build_one(copy, cfg, "scores", console)
        rc = _calibrate_after_build(args, copy, write_json=False)
        if rc != 0:
            return rc
        choice = choose_space(load_calibration(args.bundle / CALIBRATION_FILE), load_calibration(copy / CALIBRATION_FILE))
        print_space_choice(choice, console)
        if choice.chosen == "scores":
            adopt(copy, args.bundle)
            healthy = healthy_scores
    finally:
        remove_copy(copy)
    _record_choice(args.bundle, choice)
    if args.calibration_json is not None:
        atomic_write_json(args.calibration_json, load_calibration(args.bundle / CALIBRATION_FILE).to_json())
    console.print(choice.summary())
    if choice.chosen == "scores":
        console.print("live changes (/admin/entities) are refused on a score-space graph: build with --space vectors "
                      "for a catalogue that changes online")
    return 0 if healthy else 1


def _record_choice(bundle: Path, choice: Any) -> None:
    """The comparison in the manifest's graph section, so `/v1/info` readers and operators see why."""
    from contracts.manifest import read_manifest, write_manifest

    manifest = read_manifest(bundle)
    manifest["graph"]["space_choice"] = {
        "chosen": choice.chosen, "scores_over_vectors_pairs": round(choice.ratio, 4),
        "points": [{"domain": p.domain, "k": p.k, "vectors_pairs": round(p.vectors, 1), "scores_pairs": round(p.scores, 1),
                    "vectors_mode": p.vectors_mode, "scores_mode": p.scores_mode} for p in choice.points],
    }
    write_manifest(bundle, manifest)


def print_space_choice(choice: Any, console: Any) -> None:
    from rich.table import Table

    table = Table(title="graph space: pairs per query at each calibrated point (fewer wins)")
    for col in ("domain", "k", "vectors", "scores", "scores / vectors"):
        table.add_column(col, justify="right")
    for p in choice.points:
        table.add_row(p.domain, str(p.k), f"{p.vectors:,.0f} ({p.vectors_mode})", f"{p.scores:,.0f} ({p.scores_mode})",
                      f"{p.scores / p.vectors:.2f}x")
    console.print(table)


def _score_space_first(args: argparse.Namespace, bundle: Path) -> int:
    """`unimatch index score-space` (a service command: it runs the model) before a --space scores build."""
    from unimatch.cli import main as unimatch_main

    argv = ["index", "score-space", "--bundle", str(bundle), "--data", str(args.data)]
    if args.probe_users is not None:
        argv += ["--probe-users", str(args.probe_users)]
    return unimatch_main(argv)


def _calibrate_after_build(args: argparse.Namespace, bundle: Path, *, write_json: bool = True) -> int:
    """`unimatch index calibrate` on the bundle just built, with the calibration flags the user gave."""
    from unimatch.cli import main as unimatch_main

    argv = ["index", "calibrate", "--bundle", str(bundle), "--data", str(args.data)]
    for flag in ("target", "queries", "k", "max_exhaustive_pairs", "calibration_json"):
        value = getattr(args, flag)
        if value is not None and (write_json or flag != "calibration_json"):
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    return unimatch_main(argv)


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
