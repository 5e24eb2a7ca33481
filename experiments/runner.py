"""Run one experiment table resumably: prepare datasets, tune the learning rate, train and evaluate.

Layout of an experiment directory (``--out``)::

    experiment-<name>.json                      each table's config (render reads them)
    tune/<fp>/<dataset>/<method>/lr-<lr>.json   validation Recall-all of one tuning run
    tune/<fp>/<dataset>/<method>/selected.json  the learning rate chosen for the method
    runs/<fp>/<dataset>/<method>/seed-<s>.json  test Recall-all of one final run (what tables show)
    work/<fp>/<dataset>/<method>/...            the training runs (checkpoints, per-step log)

``<fp>`` is the config fingerprint (budget, tuning grid, evaluation): the Table III and Table IV
configs share their budget, so run into one directory they share the runs they have in common
(Backbone&RRL is trained once), while a changed budget lands in a new folder and never mixes.

One run = (dataset, method, seed, config) -> one JSON file, written atomically once the run is
evaluated. A file that exists with the same config fingerprint and learning rate is a finished run
and is skipped, so an interrupted experiment resumes where it stopped and a finished one re-renders
without training anything. Runs are ordered seed-major (every method's seed 0, then seed 1 ...), so
an experiment stopped by its deadline still holds comparable cells for all methods.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from contracts.io import atomic_write_json
from experiments.config import DatasetSpec, ExperimentConfig, ExperimentConfigError, parse_config

Log = Callable[[str], None]
RecallAll = dict[str, dict[str, float]]  # {"<domain>" | "average": {"<N>": recall}}

TEST_SPLIT = "test"
VALID_SPLIT = "validation"
VALID_VIEW_SUFFIX = ".valid-as-test"


class Backend(Protocol):
    """What the runner needs from the rest of UniMatch: a dataset, a trained run, Recall-all@N."""

    def prepare(self, spec: DatasetSpec, out: Path) -> Path:
        """Create the dataset directory ``out`` (or return ``spec.path``) and return it."""
        ...

    def train(
        self,
        *,
        data: Path,
        method: str,
        out: Path,
        seed: int,
        lr: float,
        epochs: int | None,
        max_steps: int | None,
        options: dict[str, Any],
        threads: int | None,
    ) -> None:
        """Train ``method`` on ``data`` into the run directory ``out``."""
        ...

    def evaluate(self, *, run: Path, data: Path, ns: list[int], max_users: int | None, seed: int) -> RecallAll:
        """Recall-all@N per domain and ``average`` on the test split of ``data``."""
        ...


@dataclass
class RunReport:
    """What one ``run_experiment`` call did."""

    done: int = 0  # runs trained and evaluated now
    skipped: int = 0  # runs found finished on disk
    pending: int = 0  # runs not started because the deadline passed
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0


def result_path(out: Path, fp: str, dataset: str, method: str, seed: int) -> Path:
    return out / "runs" / fp / dataset / method / f"seed-{seed}.json"


def tune_path(out: Path, fp: str, dataset: str, method: str, lr: float) -> Path:
    return out / "tune" / fp / dataset / method / f"lr-{lr:g}.json"


def _work_dir(out: Path, fp: str, dataset: str, method: str, tag: str) -> Path:
    return out / "work" / fp / dataset / method / tag


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _finished(path: Path, *, fingerprint: str, lr: float) -> dict[str, Any] | None:
    """The stored result at ``path`` when it was made with this config and learning rate."""
    res = _read_json(path)
    if res is None or res.get("fingerprint") != fingerprint or not math.isclose(res.get("lr", -1.0), lr):
        return None
    return res


def average_at(recall: RecallAll, n: int) -> float:
    try:
        return float(recall["average"][str(n)])
    except KeyError as exc:
        raise ValueError(f"evaluation result has no average Recall-all@{n}: keys {sorted(recall)}") from exc


def select_lr(tuned: dict[float, float]) -> float:
    """Best validation recall; ties go to the smaller learning rate (the more conservative one)."""
    if not tuned:
        raise ValueError("no tuning result to select a learning rate from")
    return max(sorted(tuned), key=lambda lr: tuned[lr])


def save_config(cfg: ExperimentConfig, out: Path) -> None:
    """Record the table's config beside the results (``render`` reads it back)."""
    atomic_write_json(out / f"experiment-{cfg.name}.json", cfg.model_dump(mode="json"))


def load_saved_configs(out: Path) -> list[ExperimentConfig]:
    """Every table config recorded in the experiment directory ``out``."""
    paths = sorted(Path(out).glob("experiment-*.json"))
    if not paths:
        raise ExperimentConfigError(f"{out} holds no experiment-*.json: run `unimatch experiment run` first")
    configs = []
    for path in paths:
        raw = _read_json(path)
        if raw is None:
            raise ExperimentConfigError(f"{path} is not valid JSON")
        configs.append(parse_config(raw, where=str(path)))
    return configs


def run_experiment(
    cfg: ExperimentConfig,
    out: Path,
    *,
    backend: Backend,
    data_root: Path | None = None,
    deadline: float | None = None,
    only_datasets: list[str] | None = None,
    only_methods: list[str] | None = None,
    only_seeds: list[int] | None = None,
    keep_going: bool = False,
    log: Log = print,
) -> RunReport:
    """Run every missing run of ``cfg`` into ``out``.

    Args:
        cfg: the table.
        out: experiment directory (created); finished runs in it are skipped.
        backend: how to prepare data, train and evaluate (library calls or the CLI).
        data_root: where prepared datasets live (default ``out/data``); share it between tables.
        deadline: ``time.time()`` after which no new run starts (the running one finishes).
        only_datasets, only_methods, only_seeds: restrict this call to part of the grid (e.g. to
            spread one table over several processes; they never write the same file).
        keep_going: log a failed run and continue instead of raising.
        log: progress lines.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    data_root = Path(data_root) if data_root is not None else out / "data"
    fingerprint = cfg.fingerprint()
    report = RunReport()
    t_start = time.perf_counter()
    for name in (only_datasets or []) + (only_methods or []):
        if name not in [d.name for d in cfg.datasets] + cfg.methods:
            raise ExperimentConfigError(f"{name!r} is neither a dataset nor a method of {cfg.name}")
    datasets = [d for d in cfg.datasets if not only_datasets or d.name in only_datasets]
    methods = [m for m in cfg.methods if not only_methods or m in only_methods]
    if only_seeds and not set(only_seeds) <= set(cfg.seeds):
        raise ExperimentConfigError(f"seeds {only_seeds} are not all among {cfg.name}'s seeds {cfg.seeds}")
    seeds = [s for s in cfg.seeds if not only_seeds or s in only_seeds]

    def out_of_time() -> bool:
        return deadline is not None and time.time() >= deadline

    def attempt(label: str, **kwargs: Any) -> dict[str, Any] | None:
        try:
            res = _train_and_eval(cfg, backend, fingerprint=fingerprint, log=log, label=label, **kwargs)
        except Exception as exc:
            if not keep_going:
                raise
            report.failed.append(f"{label}: {type(exc).__name__}: {exc}")
            log(f"FAILED {label}: {type(exc).__name__}: {exc}")
            return None
        report.done += 1
        return res

    for ds in datasets:
        data, valid_data = prepare_dataset(cfg, ds, backend=backend, data_root=data_root, log=log)

        # Learning rate per method, chosen on the validation split.
        chosen: dict[str, float | None] = {}
        for method in methods:
            if len(cfg.tuning.lrs) == 1:
                chosen[method] = cfg.tuning.lrs[0]
                continue
            tuned: dict[float, float] = {}
            for lr in cfg.tuning.lrs:
                path = tune_path(out, fingerprint, ds.name, method, lr)
                res = _finished(path, fingerprint=fingerprint, lr=lr)
                if res is not None:
                    report.skipped += 1
                    tuned[lr] = average_at(res["recall_all"], cfg.tuning.metric_n)
                    continue
                if out_of_time():
                    report.pending += 1
                    continue
                label = f"[{ds.name}] tune {method} lr={lr:g}"

                assert valid_data is not None  # written above whenever the grid has several rates
                res = attempt(
                    label, data=data, eval_data=valid_data, dataset=ds.name, method=method, seed=cfg.tuning.seed, lr=lr,
                    run_dir=_work_dir(out, fingerprint, ds.name, method, f"tune-lr-{lr:g}"), split=VALID_SPLIT,
                )  # fmt: skip
                if res is not None:
                    atomic_write_json(path, res)
                    tuned[lr] = average_at(res["recall_all"], cfg.tuning.metric_n)
            if len(tuned) == len(cfg.tuning.lrs):
                best = select_lr(tuned)
                chosen[method] = best
                atomic_write_json(
                    tune_path(out, fingerprint, ds.name, method, 1.0).with_name("selected.json"),
                    {"lr": best, "metric": f"validation average Recall-all@{cfg.tuning.metric_n}",
                     "by_lr": {f"{lr:g}": v for lr, v in sorted(tuned.items())}},
                )  # fmt: skip
                log(f"[{ds.name}] {method}: lr {best:g} (validation R@{cfg.tuning.metric_n} "
                    + ", ".join(f"{lr:g}: {v:.4f}" for lr, v in sorted(tuned.items())) + ")")  # fmt: skip
            else:
                chosen[method] = None  # tuning incomplete: its final runs wait

        for seed in seeds:
            for method in methods:
                lr_or_none = chosen[method]
                if lr_or_none is None:
                    report.pending += 1
                    continue
                lr = lr_or_none
                path = result_path(out, fingerprint, ds.name, method, seed)
                if _finished(path, fingerprint=fingerprint, lr=lr) is not None:
                    report.skipped += 1
                    continue
                if out_of_time():
                    report.pending += 1
                    continue
                label = f"[{ds.name}] {method} seed={seed} lr={lr:g}"

                # The tuning run with the chosen rate and the tuning seed is this very training run
                # (same data, budget, seed): evaluate it on the test split instead of training twice.
                tune_dir = _work_dir(out, fingerprint, ds.name, method, f"tune-lr-{lr:g}")
                reuse = len(cfg.tuning.lrs) > 1 and seed == cfg.tuning.seed and (tune_dir / ".complete").is_file()
                res = attempt(
                    label, data=data, eval_data=data, dataset=ds.name, method=method, seed=seed, lr=lr,
                    run_dir=tune_dir if reuse else _work_dir(out, fingerprint, ds.name, method, f"seed-{seed}"),
                    split=TEST_SPLIT, reuse=reuse,
                )  # fmt: skip
                if res is not None:
                    atomic_write_json(path, res)
    report.seconds = time.perf_counter() - t_start
    return report


def prepare_dataset(
    cfg: ExperimentConfig, ds: DatasetSpec, *, backend: Backend, data_root: Path, log: Log = print
) -> tuple[Path, Path | None]:
    """The dataset directory of ``ds`` (imported or generated once under ``data_root``) and, when the
    config tunes over several learning rates, its validation view; both are reused when present."""
    data = ds.path if ds.source == "path" and ds.path is not None else data_root / ds.name
    if ds.source != "path" and not (data / "dataset.json").is_file():
        log(f"[{ds.name}] preparing dataset in {data}")
        data = backend.prepare(ds, data)
    elif ds.source == "path" and not (data / "dataset.json").is_file():
        raise ExperimentConfigError(f"dataset {ds.name!r}: {data} is not a dataset directory")
    valid_data: Path | None = None
    if len(cfg.tuning.lrs) > 1:
        valid_data = data_root / f"{ds.name}{VALID_VIEW_SUFFIX}"
        if not (valid_data / "dataset.json").is_file():
            log(f"[{ds.name}] writing the validation view {valid_data}")
            validation_view(data, valid_data)
    return data, valid_data


def _train_and_eval(
    cfg: ExperimentConfig,
    backend: Backend,
    *,
    data: Path,
    eval_data: Path,
    dataset: str,
    method: str,
    seed: int,
    lr: float,
    run_dir: Path,
    split: str,
    fingerprint: str,
    log: Log,
    label: str,
    reuse: bool = False,
) -> dict[str, Any]:
    train_s = 0.0
    marker = run_dir / ".complete"
    if reuse:
        prev = _read_json(marker) or {}
        train_s = float(prev.get("train_seconds", 0.0))
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an interrupted run: start it again from scratch
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log(f"{label}: training")
        t0 = time.perf_counter()
        backend.train(
            data=data, method=method, out=run_dir, seed=seed, lr=lr, epochs=cfg.train.epochs,
            max_steps=cfg.train.max_steps, options=dict(cfg.train.options), threads=cfg.train.threads,
        )  # fmt: skip
        train_s = time.perf_counter() - t0
        atomic_write_json(marker, {"train_seconds": train_s})
    t0 = time.perf_counter()
    # Evaluation users are sampled with the run's seed, so seeds differ in users as well as weights.
    recall = backend.evaluate(run=run_dir, data=eval_data, ns=list(cfg.eval.n), max_users=cfg.eval.max_users, seed=seed)
    eval_s = time.perf_counter() - t0
    _check_recall(recall, cfg.eval.n, label)
    log(
        f"{label}: {split} average "
        + ", ".join(f"R@{n}={recall['average'][str(n)]:.4f}" for n in cfg.eval.n)
        + f" (train {train_s:.1f} s, eval {eval_s:.1f} s)"
    )
    return {
        "experiment": cfg.name,
        "dataset": dataset,
        "method": method,
        "seed": seed,
        "lr": lr,
        "split": split,
        "fingerprint": fingerprint,
        "recall_all": recall,
        "train_seconds": round(train_s, 3),
        "eval_seconds": round(eval_s, 3),
        "reused_tuning_run": reuse,
        "run_dir": str(run_dir.resolve()),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def validation_view(data: Path, out: Path) -> Path:
    """Write ``data`` with its validation interactions as the test split and its test ones dropped.

    ``unimatch eval`` scores the test split with the user's non-test history as the behaviour
    sequence (what the service sees). Relabelling validation as test and dropping the real test
    rows gives the same measurement one step earlier in time: the validation target never appears
    in its own input and the real test interactions are never looked at during tuning. Users,
    entities and schema are unchanged, so a run trained on ``data`` loads against the view.
    """
    import numpy as np

    from contracts.dataset import TEST, VALID, Interactions, load_dataset, write_dataset

    ds = load_dataset(data, mmap=False)
    split = np.asarray(ds.interactions.split)
    keep = split != TEST
    if not np.any(split == VALID):
        raise ValueError(f"{data}: no validation interactions to tune the learning rate on")
    inter = ds.interactions
    new_split = np.where(split[keep] == VALID, TEST, split[keep]).astype(np.int8)
    view = Interactions(
        user=np.asarray(inter.user)[keep],
        entity=np.asarray(inter.entity)[keep],
        domain=np.asarray(inter.domain)[keep],
        timestamp=np.asarray(inter.timestamp)[keep],
        split=new_split,
    )
    meta = {
        k: v for k, v in ds.meta.items() if k not in ("name", "counts", "files", "schema_fingerprint", "format_version")
    }
    meta["validation_view_of"] = str(data)
    return write_dataset(out, schema=ds.schema, users=ds.users, entities=ds.entities, interactions=view, meta=meta)


def _check_recall(recall: RecallAll, ns: list[int], label: str) -> None:
    if "average" not in recall:
        raise ValueError(f"{label}: evaluation returned no 'average' entry")
    for domain, by_n in recall.items():
        for n in ns:
            v = by_n.get(str(n))
            if v is None or not (0.0 <= float(v) <= 1.0):
                raise ValueError(f"{label}: Recall-all@{n} of {domain!r} is {v!r}, expected a number in [0, 1]")


def plan(cfg: ExperimentConfig, out: Path) -> dict[str, Any]:
    """Count the runs of ``cfg``, how many are finished in ``out``, and their measured cost."""
    fingerprint = cfg.fingerprint()
    n_tune = 0 if len(cfg.tuning.lrs) == 1 else len(cfg.datasets) * len(cfg.methods) * len(cfg.tuning.lrs)
    n_final = len(cfg.datasets) * len(cfg.methods) * len(cfg.seeds)
    # The final run of the tuning seed reuses its tuning run's training.
    n_train = (
        n_tune + n_final - (len(cfg.datasets) * len(cfg.methods) if n_tune and cfg.tuning.seed in cfg.seeds else 0)
    )
    seconds: list[float] = []
    finished = 0
    for path in list(Path(out).glob(f"tune/{fingerprint}/*/*/lr-*.json")) + list(
        Path(out).glob(f"runs/{fingerprint}/*/*/seed-*.json")
    ):
        res = _read_json(path)
        if res is None or res.get("fingerprint") != fingerprint:
            continue
        finished += 1
        train_s = 0.0 if res.get("reused_tuning_run") else float(res.get("train_seconds", 0.0))
        seconds.append(train_s + float(res.get("eval_seconds", 0.0)))
    mean = sum(seconds) / len(seconds) if seconds else None
    return {
        "tuning_runs": n_tune,
        "final_runs": n_final,
        "trainings": n_train,
        "finished": finished,
        "measured_seconds_per_run": mean,
        "estimated_hours_total": None if mean is None else round(mean * n_train / 3600, 2),
    }
