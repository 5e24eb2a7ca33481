"""How the runner prepares data, trains and evaluates: in-process library calls, or the CLI.

``LibraryBackend`` (the default) calls the keyword-only functions behind ``unimatch data``,
``unimatch train`` and ``unimatch eval`` in this process: no interpreter and torch start-up per
run, which matters when a CI grid trains a dozen tiny models. ``CliBackend`` runs the very
commands an operator would (``python -m unimatch.cli train ...``) as subprocesses: slower to start,
but each run gets a fresh process and the operator-facing contract is what is exercised.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from experiments.config import BackendName, DatasetSpec
from experiments.runner import Backend, RecallAll


def make_backend(name: BackendName) -> Backend:
    if name == "library":
        return LibraryBackend()
    if name == "cli":
        return CliBackend()
    raise ValueError(f"unknown backend {name!r}; expected 'library' or 'cli'")


def _prepare_with_cli(spec: DatasetSpec, out: Path) -> Path:
    if spec.source == "path":
        assert spec.path is not None  # guaranteed by DatasetSpec's validator
        return spec.path
    if spec.source == "synth":
        cmd = ["data", "synth", "--out", str(out), "--preset", str(spec.preset), "--seed", str(spec.seed)]
        if spec.domains is not None:
            cmd += ["--domains", str(spec.domains)]
    else:
        cmd = ["data", "import", str(spec.importer), "--out", str(out)]
    _unimatch(cmd)
    return out


def _unimatch(args: list[str]) -> None:
    """Run ``unimatch ARGS`` in a fresh interpreter; a failure raises with the command's last words."""
    proc = subprocess.run([sys.executable, "-m", "unimatch.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"`unimatch {' '.join(args)}` exited {proc.returncode}: {tail[0]}")


# Trainer options that `unimatch train` exposes as flags (model/cli.py).
CLI_TRAIN_FLAGS = {
    "batch_size": "--batch-size",
    "loss.num_sampled": "--negatives",
    "loss.sampler": "--sampler",
    "model.embed_dim": "--embed-dim",
    "rrl.adv_epsilon": "--adv-epsilon",
    "checkpoint_every": "--checkpoint-every",
}


class CliBackend:
    """Drive the operator-facing commands as subprocesses (CONTRACT.md names and flags)."""

    def prepare(self, spec: DatasetSpec, out: Path) -> Path:
        return _prepare_with_cli(spec, out)

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
        cmd = ["train", "--data", str(data), "--method", method, "--out", str(out), "--seed", str(seed)]
        cmd += ["--lr", repr(lr)]
        if epochs is not None:
            cmd += ["--epochs", str(epochs)]
        if max_steps is not None:
            cmd += ["--max-steps", str(max_steps)]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        for key, value in options.items():
            if key not in CLI_TRAIN_FLAGS:
                raise ValueError(
                    f"train option {key!r} has no `unimatch train` flag; the cli backend knows {sorted(CLI_TRAIN_FLAGS)}"
                )
            cmd += [CLI_TRAIN_FLAGS[key], str(value)]
        _unimatch(cmd + ["--no-progress", "--no-resume"])

    def evaluate(self, *, run: Path, data: Path, ns: list[int], max_users: int | None, seed: int) -> RecallAll:
        with tempfile.TemporaryDirectory(prefix="unimatch-exp-") as tmp:
            js = Path(tmp) / "eval.json"
            cmd = ["eval", "--run", str(run), "--data", str(data), "--n", ",".join(map(str, ns)), "--json", str(js)]
            cmd += ["--seed", str(seed), "--no-progress"]
            if max_users is not None:
                cmd += ["--users", str(max_users)]
            _unimatch(cmd)
            return json.loads(js.read_text())["recall_all"]


class LibraryBackend:
    """Call ``model.train.train`` and ``model.evaluate`` in this process."""

    def prepare(self, spec: DatasetSpec, out: Path) -> Path:
        if spec.source == "synth":
            from model.data.synth import generate, preset

            cfg = preset(str(spec.preset), seed=spec.seed)
            if spec.domains is not None:
                cfg = dataclasses.replace(cfg, num_domains=spec.domains)
            return Path(generate(cfg, out))
        return _prepare_with_cli(spec, out)

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
        from model.train import train

        train(train_config(data=data, method=method, out=out, seed=seed, lr=lr, epochs=epochs,
                           max_steps=max_steps, options=options, threads=threads))  # fmt: skip

    def evaluate(self, *, run: Path, data: Path, ns: list[int], max_users: int | None, seed: int) -> RecallAll:
        from model.evaluate import EvalConfig, evaluate

        cfg = EvalConfig(run=run, data=data, ns=tuple(ns), seed=seed, progress=False)
        if max_users is not None:
            cfg = dataclasses.replace(cfg, max_users=max_users)
        return evaluate(cfg)["recall_all"]


def train_config(
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
) -> Any:
    """The trainer's ``TrainConfig`` for one run; ``options`` keys are TrainConfig fields or
    ``model.X`` / ``loss.X`` / ``rrl.X`` for the nested parts (applied on top of the method's own)."""
    from model.config import METHODS, method_config

    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in options.items():
        part, _, field = key.partition(".")
        if field:
            if part not in ("model", "loss", "rrl"):
                raise ValueError(f"train option {key!r}: only model.*, loss.* and rrl.* are nested parts")
            nested.setdefault(part, {})[field] = tuple(value) if isinstance(value, list) else value
        else:
            top[key] = value
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
    defaults = method_config(method, data=data, out=out)
    parts: dict[str, Any] = {"model": defaults.model, "loss": defaults.loss, "rrl": defaults.rrl}
    for part, fields in nested.items():
        current = parts[part]
        for name, value in list(fields.items()):
            old = getattr(current, name, None)
            if isinstance(old, enum.Enum):  # e.g. loss.sampler: "uniform" -> NegativeSampler.UNIFORM
                fields[name] = type(old)(value)
        try:
            parts[part] = dataclasses.replace(current, **fields)
        except TypeError as exc:
            raise ValueError(f"train options for {part}: {exc}") from None
    kwargs: dict[str, Any] = dict(data=data, out=out, seed=seed, lr=lr, progress=False, threads=threads, **parts)
    if epochs is not None:
        kwargs["epochs"] = epochs
    if max_steps is not None:
        kwargs["max_steps"] = max_steps
    kwargs.update(top)
    try:
        return method_config(method, **kwargs)
    except TypeError as exc:
        raise ValueError(f"train options: {exc}") from None
