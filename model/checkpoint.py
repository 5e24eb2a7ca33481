"""Run directories and checkpoints: save atomically, load only against the schema they were trained on.

A run directory holds ``config.json`` (TrainConfig), ``schema.json`` (the dataset's FeatureSchema),
``checkpoint.pt`` (latest state, what a resume continues from), ``best.pt`` (with ``--early-stop``:
the model of the best validation check, which eval and export then use), ``log.jsonl`` (one line per step) and ``run.json`` (summary).
Checkpoints carry the schema fingerprint; ``load_run`` refuses a dataset whose schema differs, since
embedding tables and entity rows would silently mean something else.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import torch

from contracts.dataset import Dataset, load_dataset
from contracts.schema import FeatureSchema
from model.config import METHODS, TrainConfig

if TYPE_CHECKING:
    from model.backbones import MatchingModel

CHECKPOINT_FORMAT_VERSION = 1
# The two checkpoint files of a run directory (eval and run.json report which one a model came from).
CheckpointName = Literal["checkpoint.pt", "best.pt"]
CHECKPOINT: Final = "checkpoint.pt"
# Written by ``train --early-stop``: the weights of the best validation check. load_run prefers it.
BEST_CHECKPOINT: Final = "best.pt"


class CheckpointError(ValueError):
    """A run directory or checkpoint is missing, corrupt, or does not match the dataset."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` through a temporary file and rename, so a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save({"format_version": CHECKPOINT_FORMAT_VERSION, **state}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (train first: unimatch train ... --out RUN)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a corrupt file to the caller
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a UniMatch checkpoint of format {CHECKPOINT_FORMAT_VERSION}")
    return state


def check_schema(state: dict[str, Any], schema: FeatureSchema, *, where: str) -> None:
    """Refuse a checkpoint trained on another schema (different columns, cardinalities, domains...)."""
    trained = state.get("schema_fingerprint")
    if trained != schema.fingerprint():
        raise CheckpointError(
            f"{where}: checkpoint was trained on schema {trained}, but the dataset's schema is "
            f"{schema.fingerprint()}; retrain on this dataset or pass the dataset it was trained on"
        )


def check_entities(state: dict[str, Any], num_entities: int, *, where: str) -> None:
    trained = state.get("num_entities")
    if trained != num_entities:
        raise CheckpointError(f"{where}: checkpoint has {trained} entities, the dataset has {num_entities}")


@dataclass
class LoadedRun:
    cfg: TrainConfig
    dataset: Dataset
    model: MatchingModel
    state: dict[str, Any]
    checkpoint: CheckpointName = CHECKPOINT  # file name of the checkpoint the model came from


def read_config(run: Path) -> TrainConfig:
    path = Path(run) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{run}: not a run directory (config.json missing)")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None
    return TrainConfig.from_json(obj)


def load_run(run: Path, *, data: Path | None = None) -> LoadedRun:
    """Rebuild a trained model from ``run`` against its dataset (or ``data``), checking the schema."""
    from model.backbones import build_model
    from model.embeddings import EntityTable

    run = Path(run)
    cfg = read_config(run)
    # an early-stopped run's best weights, not its last ones (the trainer removes a stale best.pt)
    name: CheckpointName = BEST_CHECKPOINT if (run / BEST_CHECKPOINT).is_file() else CHECKPOINT
    state = load_checkpoint(run / name)
    ds = load_dataset(data if data is not None else cfg.data)
    check_schema(state, ds.schema, where=str(run))
    check_entities(state, len(ds.entities), where=str(run))
    ents = EntityTable(np.asarray(ds.entities.cat), np.asarray(ds.entities.num), np.asarray(ds.entities.entity_type))
    model = build_model(ds.schema, ents, cfg.model, METHODS[cfg.method].architecture)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"{run}: checkpoint does not fit the model of config.json ({first})") from None
    model.eval()
    return LoadedRun(cfg=cfg, dataset=ds, model=model, state=state, checkpoint=name)
