"""Benchmark of the synthetic generator (`unimatch data synth`): wall time and peak memory per preset.

Each preset runs in its own child process, so the peak resident set (``VmHWM`` of
``/proc/self/status``, read by the child just before it exits) belongs to that run alone. The parent
writes the results as JSON and as a markdown table between markers in ``docs/data.md``. A benchmark,
not a timed test: run it by hand on an otherwise idle machine when possible, and say when not.

    .venv/bin/python benchmarks/bench_synth.py --presets tiny,small,100k,1m --out /tmp/bench_synth
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench_synth:begin -->", "<!-- bench_synth:end -->"


def _peak_rss_bytes() -> int:
    """Peak resident set of this process (VmHWM), in bytes."""
    text = Path("/proc/self/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+)\s+kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError("VmHWM not found in /proc/self/status (Linux only)")
    return int(match.group(1)) * 1024


def run_child(preset_name: str, out: Path, seed: int) -> dict[str, Any]:
    """Generate one preset in this (child) process and measure it."""
    from model.data.synth import generate, preset

    cfg = preset(preset_name, seed=seed)
    t0, c0 = time.perf_counter(), time.process_time()
    generate(cfg, out)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    manifest = json.loads((out / "dataset.json").read_text())
    return {
        "preset": preset_name,
        "seed": seed,
        "users": manifest["counts"]["users"],
        "entities": manifest["counts"]["entities"],
        "interactions": manifest["counts"]["interactions"],
        "wall_s": round(wall, 2),
        # CPU seconds of this process: less inflated than wall time when other jobs share the cores
        "cpu_s": round(cpu, 2),
        "peak_rss_mib": round(_peak_rss_bytes() / 2**20, 1),
        "disk_mib": round(sum(f["bytes"] for f in manifest["files"].values()) / 2**20, 1),
    }


def bench(presets: list[str], out_dir: Path, seed: int) -> list[dict[str, Any]]:
    results = []
    for name in presets:
        target = out_dir / f"synth-{name}"
        proc = subprocess.run(
            [sys.executable, __file__, "--child", name, "--out", str(target), "--seed", str(seed)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        if proc.returncode != 0:
            raise SystemExit(f"bench_synth: preset {name} failed:\n{proc.stderr}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"{name:>6}: {row['entities']:>9,} entities {row['users']:>8,} users {row['interactions']:>11,} interactions "
            f"{row['wall_s']:>7.1f} s wall {row['cpu_s']:>7.1f} s CPU  peak RSS {row['peak_rss_mib']:>7.0f} MiB  on disk {row['disk_mib']:>6.0f} MiB",
            flush=True,
        )
        results.append(row)
        shutil.rmtree(target, ignore_errors=True)  # the 1m dataset is ~0.5 GB; keep /tmp clean
    return results


def markdown(results: list[dict[str, Any]], command: str, machine: dict[str, Any]) -> str:
    lines = [
        f"Measured {machine['date']} on {machine['cpus']} CPU(s) ({machine['processor']}), Python {machine['python']}; "
        "the CPUs were shared with other engineers' jobs (1/5/15-min load average at the end: "
        + ", ".join(f"{x:.1f}" for x in machine["load_average_at_end"])
        + "), so times are upper bounds. Command:",
        "",
        "```bash",
        command,
        "```",
        "",
        "| preset | entities | users | interactions | wall time (s) | CPU time (s) | peak RSS (MiB) | on disk (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['preset']} | {r['entities']:,} | {r['users']:,} | {r['interactions']:,} | {r['wall_s']:.1f} | "
            f"{r['cpu_s']:.1f} | "
            f"{r['peak_rss_mib']:,.0f} | {r['disk_mib']:,.0f} |"
        )
    return "\n".join(lines)


def update_doc(doc: Path, table: str) -> None:
    """Replace the text between the markers in ``doc`` (appending a section if there are none)."""
    text = doc.read_text() if doc.is_file() else "# Data\n"
    block = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n## Generator benchmark\n\n" + block + "\n"
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, doc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,small,100k,1m", help="comma-separated presets to run")
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_synth"), help="scratch folder for the datasets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=REPO / "docs" / "data-synth-bench.json", help="results file")
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "data.md", help="markdown file to update")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.out, args.seed)))
        return 0
    presets = [s for s in args.presets.split(",") if s]
    results = bench(presets, args.out, args.seed)
    machine = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "load_average_at_end": os.getloadavg(),
    }
    command = f".venv/bin/python benchmarks/bench_synth.py --presets {','.join(presets)} --out {args.out}"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": command, "machine": machine, "results": results}, indent=2) + "\n")
    update_doc(args.doc, markdown(results, command, machine))
    print(f"wrote {args.json} and the table in {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
