"""`unimatch data ...` commands: synthesise, import and describe datasets (thin layer over model.data)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from unimatch.cli import CommandRegistry

GROUP_HELP = "create, import and inspect datasets in the unified entity space"


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
    p.add_argument("--out", type=Path, required=True, help="dataset directory to write (replaced atomically)")
    p.add_argument("--preset", choices=["tiny", "small", "100k", "1m"], default="small", help="dataset size")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed and preset give the same dataset")
    p.add_argument("--domains", type=int, default=None, help="number of domains (default: the preset's, 4)")


def _synth(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from rich.progress import Progress

    from model.data.synth import generate, preset

    cfg = preset(args.preset, seed=args.seed)
    if args.domains is not None:
        if not 1 <= args.domains <= 64:
            raise ValueError(f"--domains must be in 1..64, got {args.domains}")
        cfg = replace(cfg, num_domains=args.domains)
    t0 = time.perf_counter()
    with Progress(transient=True) as bar:
        task = bar.add_task(f"synth {args.preset}: users", total=cfg.num_users)
        out = generate(cfg, args.out, progress=lambda done, total: bar.update(task, completed=done))
    print(
        f"wrote {out}: {cfg.num_users:,} users, {cfg.num_entities:,} entities, "
        f"~{cfg.num_interactions:,} interactions in {time.perf_counter() - t0:.1f} s"
    )
    return 0
