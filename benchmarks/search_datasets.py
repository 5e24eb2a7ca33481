"""One table and one plot across datasets from `unimatch bench search --json` results (calibrated bundles).

    python -m benchmarks.search_datasets --md docs/search-benchmark-datasets.md \\
        --plot docs/search-benchmark-datasets.png amazon-phone-electronic=docs/x.json movielens-100k=docs/y.json

Table: dataset, catalogue size, model and its training budget, coverage@k at the calibrated point with
its 95% interval (one column per k in the results), share of the catalogue scored, p50/p99, speed-up
over exhaustive scoring of the same model, mode. Plot: coverage@k against the share of the catalogue
scored, one curve per dataset: the upper envelope of that run's ef/T sweep (the best coverage reached
at or below each share), with the calibrated point marked.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any


def _mode(r: dict[str, Any]) -> str:
    share = r.get("graph_share", 1.0)
    return "graph" if share == 1.0 else "exhaustive" if share == 0.0 else f"{share:.0%} graph"


def table(runs: list[tuple[str, dict[str, Any]]]) -> str:
    ks = sorted({int(k) for _, res in runs for k in res["k"]})
    head = ["dataset", "catalogue", "model (training steps)", "queries"]
    head += [f"coverage@{k}" for k in ks]
    head += ["scored (k=200)", "p50 / p99 ms (k=200)", "speed-up vs exhaustive (k=200)", "mode per k"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, res in runs:
        steps = res.get("training_steps")
        row = [label, f"{res['catalogue_size']:,}", f"{res.get('method')} ({steps if steps is not None else '?'})",
               str(res["queries"])]
        for k in ks:
            r = res["k"].get(str(k))
            row.append("—" if r is None else f"{r['coverage']:.4f} ± {r['coverage_ci95']:.4f}")
        r200 = res["k"].get("200") or next(iter(res["k"].values()))
        row += [f"{r200['scored_fraction']:.2%}", f"{r200['latency_ms_p50']:.1f} / {r200['latency_ms_p99']:.1f}",
                f"{r200['speedup_vs_exhaustive']:.1f}×",
                ", ".join(f"{k}: {_mode(r)}" for k, r in res["k"].items())]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def envelope(points: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(share scored, best coverage at or below that share), increasing share."""
    pts = sorted((p["scored_fraction"], p["coverage"]) for p in points)
    out: list[tuple[float, float]] = []
    best = -1.0
    for share, cov in pts:
        if cov > best:
            best = cov
            out.append((share, cov))
    return out


def plot(runs: list[tuple[str, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (label, res) in enumerate(runs):
        color = f"C{i}"
        sweep = res.get("sweep")
        k = str(sweep["k"]) if sweep else "200"
        if sweep:
            pts = [p for series in sweep["series"].values() for p in series]
            env = envelope(pts)
            ax.plot([100 * s for s, _ in env], [c for _, c in env], marker="o", ms=3, color=color,
                    label=f"{label} ({res['catalogue_size']:,}), sweep envelope")
        r = res["k"].get(k)
        if r is not None:
            ax.scatter([100 * r["scored_fraction"]], [r["coverage"]], marker="*", s=160, color=color, edgecolor="black",
                       zorder=5, label=f"{label}: calibrated ({_mode(r)})")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("share of the catalogue scored (%, log scale)")
    ax.set_ylabel("coverage@200 of the model's own top-200")
    ax.axhline(0.99, color="grey", lw=0.8, ls="--")
    ax.set_title("Calibrated graph search: coverage against share scored")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="LABEL=JSON", help="a `bench search --json` result per dataset")
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    runs = []
    for text in args.runs:
        label, sep, path = text.partition("=")
        if not sep:
            ap.error(f"expected LABEL=JSON, got {text!r}")
        res = json.loads(Path(path).read_text())
        runs.append((label, res))
    md = table(runs)
    print(md)
    if args.md:
        args.md.write_text(md)
    if args.plot:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
