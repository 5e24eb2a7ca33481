"""Turn an experiment directory's result files into the paper's tables and figures.

- Table III analog (``kind: comparison``): Recall-all@N per domain and averaged, mean ± std over
  seeds, relative change of the mean against the reference method (DNN in the paper).
- Table IV analog (``kind: ablation``): the same against Backbone.
- Fig. 4 analog: average Recall-all against N for every method, one panel per dataset.
- Fig. 5 analog: the UWL weight of each auxiliary loss over training (Eq. 25), read from the
  per-step log of the ``uwl_method``'s training run.

Only finished runs made with the current config (same fingerprint) are shown; a cell with fewer
seeds than the config asks for says so in its ``seeds`` column. Nothing here invents a number: a
missing run is a missing cell.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.io import atomic_write_json, atomic_write_text
from experiments.config import ExperimentConfig, method_label
from experiments.runner import load_saved_configs, result_path, select_lr, tune_path


@dataclass(frozen=True)
class Cell:
    """One method's Recall-all@N in one domain over its seeds."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        # Sample std (ddof=1): the seed-to-seed spread; undefined for a single seed.
        return statistics.stdev(self.values) if self.n > 1 else None


def collect(cfg: ExperimentConfig, out: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """dataset -> method -> the finished final-run results (current fingerprint, configured seeds)."""
    fp = cfg.fingerprint()
    found: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for ds in cfg.datasets:
        for method in cfg.methods:
            for seed in cfg.seeds:
                path = result_path(out, fp, ds.name, method, seed)
                try:
                    res = json.loads(path.read_text())
                except (FileNotFoundError, json.JSONDecodeError):
                    continue
                if res.get("fingerprint") == fp:
                    found.setdefault(ds.name, {}).setdefault(method, []).append(res)
    return found


def domains_of(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Domain names in the order the evaluator reported them, ``average`` last."""
    names: list[str] = []
    for runs in results.values():
        for res in runs:
            for d in res["recall_all"]:
                if d != "average" and d not in names:
                    names.append(d)
    return names + ["average"]


def cells(runs: list[dict[str, Any]], domain: str, n: int) -> Cell | None:
    vals = [float(r["recall_all"][domain][str(n)]) for r in runs if str(n) in r["recall_all"].get(domain, {})]
    return Cell(tuple(vals)) if vals else None


def relative_change(value: float, ref: float) -> float | None:
    return None if ref == 0 else (value - ref) / ref


def effect_over_se(a: Cell, ref: Cell) -> float | None:
    """Difference of means in units of its standard error (Welch); None without two seeds each."""
    if a.std is None or ref.std is None:
        return None
    se = math.sqrt(a.std**2 / a.n + ref.std**2 / ref.n)
    if se == 0:
        return None
    return (a.mean - ref.mean) / se


@dataclass(frozen=True)
class Paired:
    """Relative change against the reference seed by seed (same seed = same test users, same init)."""

    changes: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.changes)

    @property
    def t(self) -> float | None:
        """Mean change over its standard error (paired t, n-1 degrees of freedom)."""
        if len(self.changes) < 2:
            return None
        sd = statistics.stdev(self.changes)
        return None if sd == 0 else self.mean / (sd / math.sqrt(len(self.changes)))


def paired_change(runs: list[dict[str, Any]], ref_runs: list[dict[str, Any]], domain: str, n: int) -> Paired | None:
    """Per-seed relative change of Recall-all@n against the reference run of the same seed.

    The evaluator samples its test users from the run's seed, so the seed-to-seed spread of a cell
    mixes the user sample with training noise; pairing by seed removes the user sample, which is
    what moves every method together.
    """
    ref_by_seed = {r["seed"]: r for r in ref_runs}
    changes: list[float] = []
    for r in sorted(runs, key=lambda r: r["seed"]):
        ref = ref_by_seed.get(r["seed"])
        if ref is None:
            continue
        try:
            value, base = float(r["recall_all"][domain][str(n)]), float(ref["recall_all"][domain][str(n)])
        except KeyError:
            continue
        if base > 0:
            changes.append((value - base) / base)
    return Paired(tuple(changes)) if changes else None


def _fmt_paired(p: Paired | None) -> str:
    if p is None:
        return "n/a"
    t = p.t
    return f"{p.mean * 100:+.1f}% ({'n/a' if t is None else f'{t:+.1f}'})"


def _fmt(cell: Cell | None) -> str:
    if cell is None:
        return "–"
    if cell.std is None:
        return f"{cell.mean:.4f}"
    return f"{cell.mean:.4f} ± {cell.std:.4f}"


def _fmt_rel(cell: Cell | None, ref: Cell | None, is_ref: bool) -> str:
    if is_ref:
        return "–"
    if cell is None or ref is None:
        return "n/a"
    rel = relative_change(cell.mean, ref.mean)
    return "n/a" if rel is None else f"{rel * 100:+.2f}%"


def summarise(cfg: ExperimentConfig, out: Path) -> dict[str, Any]:
    """All aggregates as one JSON-able dict (``results.json``)."""
    found = collect(cfg, out)
    summary: dict[str, Any] = {"experiment": cfg.name, "kind": cfg.kind, "reference": cfg.reference, "datasets": {}}
    for ds in cfg.datasets:
        results = found.get(ds.name, {})
        doms = domains_of(results)
        per_method: dict[str, Any] = {}
        for method in cfg.methods:
            runs = results.get(method, [])
            if not runs:
                continue
            entry: dict[str, Any] = {
                "seeds": sorted(r["seed"] for r in runs),
                "lr": runs[0]["lr"],
                "train_seconds_mean": statistics.fmean(float(r.get("train_seconds", 0.0)) for r in runs),
                "recall_all": {},
            }
            for d in doms:
                entry["recall_all"][d] = {}
                for n in cfg.eval.n:
                    c = cells(runs, d, n)
                    if c is not None:
                        entry["recall_all"][d][str(n)] = {"mean": c.mean, "std": c.std, "values": list(c.values)}
            ref_runs = results.get(cfg.reference, [])
            if method != cfg.reference and ref_runs:
                entry["paired_change_vs_reference"] = {}
                for n in cfg.eval.n:
                    p = paired_change(runs, ref_runs, "average", n)
                    if p is not None:
                        entry["paired_change_vs_reference"][str(n)] = {
                            "mean": p.mean,
                            "t": p.t,
                            "values": list(p.changes),
                        }
            per_method[method] = entry
        tuned = tuning_results(cfg, out, ds.name)
        summary["datasets"][ds.name] = {
            "domains": doms,
            "methods": per_method,
            "tuning": {m: {f"{lr:g}": v for lr, v in sorted(by_lr.items())} for m, by_lr in tuned.items()},
        }
    return summary


def table_markdown(cfg: ExperimentConfig, out: Path, *, n: int | None = None) -> str:
    """Markdown of the Table III / IV analog for every dataset of the experiment."""
    n = n if n is not None else cfg.eval.table_n
    found = collect(cfg, out)
    ref_label = method_label(cfg.reference)
    title = "Table III analog" if cfg.kind == "comparison" else "Table IV analog"
    lines: list[str] = []
    for ds in cfg.datasets:
        results = found.get(ds.name, {})
        lines.append(f"### {title}: {ds.name}, Recall-all@{n} (test split)")
        lines.append("")
        if not results:
            lines.append("No finished run.")
            lines.append("")
            continue
        doms = domains_of(results)
        head = ["Method", "seeds", "lr"]
        for d in doms:
            head += [f"{d}", f"vs {ref_label}"]
        head += ["Δ avg / SE", "paired Δ avg (t)"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (2 * len(doms) + 2)) + "|")
        ref_runs = results.get(cfg.reference, [])
        pair_counts: set[int] = set()  # seeds actually paired per row: the t's degrees of freedom + 1
        for method in cfg.methods:
            runs = results.get(method, [])
            if not runs:
                continue
            row = [method_label(method), f"{len(runs)}/{len(cfg.seeds)}", f"{runs[0]['lr']:g}"]
            for d in doms:
                c = cells(runs, d, n)
                ref = cells(ref_runs, d, n) if ref_runs else None
                row += [_fmt(c), _fmt_rel(c, ref, method == cfg.reference)]
            c_avg = cells(runs, "average", n)
            ref_avg = cells(ref_runs, "average", n) if ref_runs else None
            z = None if method == cfg.reference or c_avg is None or ref_avg is None else effect_over_se(c_avg, ref_avg)
            row.append("–" if method == cfg.reference else ("n/a" if z is None else f"{z:+.1f}"))
            paired = None if method == cfg.reference else paired_change(runs, ref_runs, "average", n)
            if paired is not None:
                pair_counts.add(len(paired.changes))
            row.append("–" if method == cfg.reference else _fmt_paired(paired))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lines.append(
            f"Mean ± sample std over seeds; relative change of the mean against {ref_label}; "
            "'Δ avg / SE' is the difference of average means over its standard error (Welch), "
            "|Δ/SE| < 2 is within seed noise. 'paired Δ avg (t)': the change against the "
            f"{ref_label} run of the same seed (same test users), averaged over seeds, and its paired t "
            f"({_df_note(pair_counts or {len(cfg.seeds)})})."
        )
        lines.append("")
        tuning = tuning_markdown(cfg, out, ds.name)
        if tuning:
            lines += tuning
        # Average recall at every evaluated N (the numbers behind the Fig. 4 analog).
        lines.append(f"Average Recall-all@N, {ds.name}:")
        lines.append("")
        lines.append("| Method | " + " | ".join(f"@{k}" for k in cfg.eval.n) + " |")
        lines.append("|---|" + "|".join(["---:"] * len(cfg.eval.n)) + "|")
        for method in cfg.methods:
            runs = results.get(method, [])
            if runs:
                lines.append(
                    f"| {method_label(method)} | "
                    + " | ".join(_fmt(cells(runs, "average", k)) for k in cfg.eval.n)
                    + " |"
                )
        lines.append("")
    return "\n".join(lines)


# Two-sided 5% critical values of Student's t by degrees of freedom (the seed counts configs use).
_T_CRIT = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def _df_note(pair_counts: set[int]) -> str:
    """The paired t's 5% level for the seed counts actually paired (a partial grid has fewer than the
    config's seeds, and 1 df needs |t| > 12.7, not the 4.3 of 3 seeds)."""
    parts = [
        f"{k - 1} df: |t| > {_T_CRIT.get(k - 1, 2.0):.1f}" for k in sorted(pair_counts, reverse=True) if k >= 2
    ]
    return ("; ".join(parts) or "fewer than 2 paired seeds: no t") + " is the two-sided 5% level"


def tuning_results(cfg: ExperimentConfig, out: Path, dataset: str) -> dict[str, dict[float, float]]:
    """method -> {learning rate: validation average Recall-all@metric_n} of the finished tuning runs."""
    fp = cfg.fingerprint()
    found: dict[str, dict[float, float]] = {}
    for method in cfg.methods:
        for lr in cfg.tuning.lrs:
            try:
                res = json.loads(tune_path(out, fp, dataset, method, lr).read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            value = res.get("recall_all", {}).get("average", {}).get(str(cfg.tuning.metric_n))
            if res.get("fingerprint") == fp and value is not None:
                found.setdefault(method, {})[lr] = float(value)
    return found


def tuning_markdown(cfg: ExperimentConfig, out: Path, dataset: str) -> list[str]:
    """The learning-rate grid on the validation split: what every method scored at every rate."""
    if len(cfg.tuning.lrs) < 2:
        return []
    tuned = tuning_results(cfg, out, dataset)
    if not tuned:
        return []
    lines = [
        f"Learning-rate choice, {dataset}: validation average Recall-all@{cfg.tuning.metric_n} "
        f"(seed {cfg.tuning.seed}; **bold** = chosen, used for every seed):",
        "",
        "| Method | " + " | ".join(f"lr {lr:g}" for lr in cfg.tuning.lrs) + " |",
        "|---|" + "|".join(["---:"] * len(cfg.tuning.lrs)) + "|",
    ]
    for method in cfg.methods:
        by_lr = tuned.get(method)
        if not by_lr:
            continue
        best = select_lr(by_lr) if len(by_lr) == len(cfg.tuning.lrs) else None  # the runner's own rule
        row = []
        for lr in cfg.tuning.lrs:
            v = by_lr.get(lr)
            row.append("–" if v is None else (f"**{v:.4f}**" if lr == best else f"{v:.4f}"))
        lines.append(f"| {method_label(method)} | " + " | ".join(row) + " |")
    lines.append("")
    return lines


def plot_recall_vs_n(cfg: ExperimentConfig, out: Path, png: Path) -> Path | None:
    """Fig. 4 analog: average Recall-all@N (mean ± std over seeds) against N, one panel per dataset."""
    found = collect(cfg, out)
    datasets = [d.name for d in cfg.datasets if found.get(d.name)]
    if not datasets:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on these machines
    import matplotlib.pyplot as plt

    # Top: the paper's Fig. 4 (recall against N). Bottom: the same over the reference method, since
    # on small budgets the curves overlap and the differences are what the tables are about.
    fig, axes = plt.subplots(2, len(datasets), figsize=(5.5 * len(datasets), 7.5), squeeze=False, sharex="col")
    for col, name in enumerate(datasets):
        ax, rax = axes[0][col], axes[1][col]
        ref_runs = found[name].get(cfg.reference)
        for method in cfg.methods:
            runs = found[name].get(method)
            if not runs:
                continue
            xs, ys, es, rel = [], [], [], []
            for k in cfg.eval.n:
                c = cells(runs, "average", k)
                if c is None:
                    continue
                xs.append(k)
                ys.append(c.mean)
                es.append(c.std or 0.0)
                ref = cells(ref_runs, "average", k) if ref_runs else None
                rel.append(c.mean / ref.mean if ref is not None and ref.mean > 0 else float("nan"))
            style = "-" if method in (cfg.reference, "backbone-rrl") else "--"
            # One colour per method of the config, not per panel: a panel missing a method (a
            # partial grid) must not shift the colours of the others.
            color = f"C{cfg.methods.index(method) % 10}"
            ax.errorbar(xs, ys, yerr=es, fmt=style + "o", ms=3, capsize=2, color=color, label=method_label(method))
            rax.plot(xs, rel, style + "o", ms=3, color=color, label=method_label(method))
        ax.set_xscale("log")
        ax.set_ylabel("average Recall-all@N")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        rax.axhline(1.0, color="grey", lw=0.8)
        rax.set_xscale("log")
        rax.set_xlabel("N (entities retrieved)")
        rax.set_ylabel(f"ratio to {method_label(cfg.reference)} (mean)")
        rax.grid(True, alpha=0.3)
    # The legend lists every method plotted in any panel (the last panel may hold fewer).
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    order = [method_label(m) for m in cfg.methods]
    labels = sorted(handles, key=lambda label: order.index(label) if label in order else len(order))
    axes[0][-1].legend([handles[label] for label in labels], labels, fontsize=7, loc="best")
    fig.suptitle(f"{cfg.name}\naverage Recall-all@N over domains, mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    _save_fig(fig, png)
    plt.close(fig)
    return png


# ---------------------------------------------------------------- Fig. 5: UWL weights over training


# The trainer's names of the four auxiliary losses (model.train.AUX_NAMES) and the paper's symbols.
AUX_LABELS = {
    "dal_shared": "L_s (DAL shared, Eq. 15)",
    "dal_specific": "L_d (DAL specific, Eq. 17)",
    "wasserstein": "L_wd (MVWDL, Eq. 20)",
    "ortho": "L_ortho (Eq. 24)",
}
STEP_LOG = "log.jsonl"


def read_uwl_weights(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-step weight of each auxiliary loss from a training run's per-step log.

    The trainer (model.train) writes one JSON object per step to ``log.jsonl`` in the run directory,
    with ``step`` and an ``aux_weights`` mapping ``{loss name: weight}``: the factor 1/(2σ²) of
    Eq. 25 under UWL, the fixed 0.01 without. Returns ``{loss name: [(step, weight), ...]}``.
    """
    log = Path(run_dir) / STEP_LOG
    if not log.is_file():
        raise FileNotFoundError(f"{run_dir} has no per-step training log {STEP_LOG}")
    series: dict[str, list[tuple[int, float]]] = {}
    with log.open() as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{log}:{lineno}: not JSON ({exc})") from exc
            weights = rec.get("aux_weights")
            if not weights:
                continue
            step = int(rec["step"])
            for name, w in weights.items():
                if w is not None:
                    series.setdefault(name, []).append((step, float(w)))
    if not series:
        raise ValueError(f"{log} holds no 'aux_weights': was the run trained with auxiliary losses?")
    return series


def plot_uwl_weights(cfg: ExperimentConfig, out: Path, png: Path) -> Path | None:
    """Fig. 5 analog from the first finished final run of ``cfg.uwl_method`` (first dataset, seed)."""
    if cfg.uwl_method is None:
        return None
    found = collect(cfg, out)
    for ds in cfg.datasets:
        runs = sorted(found.get(ds.name, {}).get(cfg.uwl_method, []), key=lambda r: r["seed"])
        for res in runs:
            run_dir = Path(res["run_dir"])
            if not run_dir.is_dir() and not run_dir.is_absolute():
                run_dir = out / run_dir  # a relative path may be relative to the experiment directory
            if not run_dir.is_dir():
                continue  # runs moved or pruned: the tables still render, Fig. 5 cannot
            series = read_uwl_weights(run_dir)
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6.5, 4.2))
            for name, pts in series.items():
                ax.plot([s for s, _ in pts], [w for _, w in pts], label=AUX_LABELS.get(name, name), lw=1.2)
            ax.set_xlabel("training step")
            ax.set_ylabel("UWL weight 1/(2σ²), log scale")
            ax.set_yscale("log")
            ax.set_title(f"{method_label(cfg.uwl_method)} on {ds.name}, seed {res['seed']}", fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            _save_fig(fig, png)
            plt.close(fig)
            return png
    return None


def _save_fig(fig: Any, png: Path) -> None:
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=130)
    tmp.replace(png)


def render(out: Path, *, cfg: ExperimentConfig | None = None) -> dict[str, Path]:
    """Write ``results-<name>.json``, ``tables-<name>.md`` and the figures of one table, or of every
    table recorded in the experiment directory when ``cfg`` is None."""
    out = Path(out)
    configs = [cfg] if cfg is not None else load_saved_configs(out)
    written: dict[str, Path] = {}
    for c in configs:
        atomic_write_json(out / f"results-{c.name}.json", summarise(c, out))
        written[f"{c.name}/results"] = out / f"results-{c.name}.json"
        md = [f"## {c.name}", ""]
        if c.description:
            md += [c.description, ""]
        md.append(table_markdown(c, out))
        atomic_write_text(out / f"tables-{c.name}.md", "\n".join(md))
        written[f"{c.name}/tables"] = out / f"tables-{c.name}.md"
        fig4 = plot_recall_vs_n(c, out, out / f"fig4-{c.name}.png")
        if fig4 is not None:
            written[f"{c.name}/fig4"] = fig4
        fig5 = plot_uwl_weights(c, out, out / f"fig5-{c.name}.png")
        if fig5 is not None:
            written[f"{c.name}/fig5"] = fig5
    return written
