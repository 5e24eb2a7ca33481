"""`unimatch index calibrate` (the cheapest search point per domain and k, service.calibrate), `index
score-space` (a graph space aligned with the scorer, service.score_space) and `index compact`.

The command sits in the ``index`` group beside `index build` (it completes the bundle the build wrote),
but it is the service's measurement: it runs the engine itself on held-out users. `unimatch index build
--data D` runs this command after the build through the command line, so the index builder never
imports the service.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from unimatch.cli import CommandRegistry, check_out_file, int_list, wide_console

GROUP_HELP = "the search graph of a bundle: build it (HNSW), calibrate the search on it, compact live changes into it"


def register(cli: CommandRegistry) -> None:
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
    s = cli.group_command(
        "index",
        "score-space",
        help="describe each entity also by its scores for probe users: a graph space aligned with the model",
        description="Score every entity for --probe-users (user, domain) pairs of the dataset's training split, "
        "standardise each probe user's scores, and write [entity vectors, score profile] (each block at unit "
        "mean norm) to BUNDLE/entities/graph_vectors.npy with a graph_space section in manifest.json "
        "(entities/vectors.npy is not modified). `unimatch index build --space scores` builds the graph over "
        "it: entities the model scores alike become neighbours. No live insertions on such a graph.",
        handler=_score_space,
        group_help=GROUP_HELP,
    )
    s.add_argument("--bundle", type=Path, required=True, help="bundle written by `unimatch export`")
    s.add_argument("--data", type=Path, required=True, help="the dataset the bundle was trained on")
    s.add_argument("--probe-users", type=int, default=128, help="probe (user, domain) pairs, split over domains")
    s.add_argument("--seed", type=int, default=0, help="seeds the choice of probe users")
    s.add_argument("--workers", type=int, default=0, help="scoring threads (0 = every CPU this process may use)")
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
    k.add_argument("--force", action="store_true",
                   help="replace a bundle unimatch wrote at --out (a directory with other files is never replaced)")



def _calibration_args(p: argparse.ArgumentParser) -> None:
    from contracts.calibration import CalibrateConfig  # numpy + json only: cheap at start-up

    d = CalibrateConfig()
    p.add_argument("--target", type=float, default=d.target, help="mean coverage@k of the model's own top-k to reach")
    p.add_argument("--queries", type=int, default=d.queries,
                   help="held-out (user, domain) queries in all, split evenly over domains (all if fewer)")
    p.add_argument("--k", dest="ks", type=_ints, default=d.ks,
                   help="comma-separated k buckets; a request uses the smallest bucket >= its k")
    p.add_argument("--max-exhaustive-pairs", type=float, default=d.max_exhaustive_pairs,
                   help="bound on the exhaustive reference's pair evaluations (caps queries on large catalogues)")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="threads scoring the exhaustive reference (0 = every CPU this process may use)")
    p.add_argument("--calibration-json", type=Path, default=None, help="also write the calibration to this file")


def _ints(text: str) -> tuple[int, ...]:
    return int_list(text, positive=True)


def _run_calibration(args: argparse.Namespace, console: Any) -> int:
    """Calibrate ``args.bundle`` on ``args.data``, print the table; 0 when every domain was calibrated."""
    from contracts.calibration import CalibrateConfig
    from contracts.io import atomic_write_json
    from service.calibrate import calibrate_bundle

    cfg = CalibrateConfig(target=args.target, queries=args.queries, ks=args.ks,
                          max_exhaustive_pairs=args.max_exhaustive_pairs, workers=args.workers)
    check_out_file(args.calibration_json, "--calibration-json")
    from unimatch.progress import progress as progress_of

    with progress_of("calibrating", console=console) as update:
        cal = calibrate_bundle(args.bundle, args.data, cfg, log=lambda m: console.print(m),
                               # total 0 (a stage of unknown length): no total, not the last stage's
                               progress=lambda stage, done, total: update(done, total, stage=stage))
    print_calibration(cal, console)
    if args.calibration_json is not None:
        atomic_write_json(args.calibration_json, cal.to_json())
    console.print(f"wrote {args.bundle}/calibration.json ({cal.seconds:.0f} s); manifest updated")
    return 0


def _compact(args: argparse.Namespace) -> int:
    from service.compact import compact

    console = wide_console()
    report = compact(bundle=args.bundle, out=args.out, redis_url=args.redis_url, prefix=args.redis_key_prefix,
                     until=args.until, force=args.force)
    console.print(
        f"wrote {args.out}: bundle {report['bundle_version']}, {report['num_entities']:,} entities "
        f"({report['rows_added']:,} added online, {report['paused']:,} paused, {report['dead']:,} dead), "
        f"log {report['lineage']} folded up to {report['position']} ({report['entries']:,} entries)"
    )
    return 0


def _score_space(args: argparse.Namespace) -> int:
    from unimatch.cli import CliError

    if args.probe_users < 1 or args.workers < 0:
        raise CliError("--probe-users must be >= 1 and --workers >= 0")
    from service.score_space import write_score_space
    from unimatch.progress import progress as progress_of

    console = wide_console()
    with progress_of("score space") as update:
        section = write_score_space(args.bundle, args.data, probe_users=args.probe_users, seed=args.seed,
                                    workers=args.workers, progress=lambda done, total: update(done, total, stage="probe users"))
    console.print(f"wrote {args.bundle}/{section['file']}: {section['vector_dim']} vector dims + {section['probe_users']} "
                  f"probe-user scores ({section['seconds']:.0f} s); `unimatch index build --space scores` builds the graph over it")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    return _run_calibration(args, wide_console())


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


