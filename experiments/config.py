"""The config file of one experiment table: which datasets, methods, seeds, budget and tuning grid.

One file per table (``experiments/configs/table3_*.json``, ``table4_*.json``, ``ci_tiny.json``).
The same budget and the same learning-rate grid apply to every method of a table, so tuning effort
is equal by construction: the learning rate is chosen on the validation split with the same tuning
effort for all, so no method wins by having been tuned harder. Unknown keys are refused, so a typo in a config fails loudly instead of silently
running the default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model.data import ImportSource, SynthPreset

# Paper names of the methods (section V-A2, V-C), in the order the paper's tables list them.
METHOD_LABELS: dict[str, str] = {
    "dnn": "DNN",
    "shared-bottom": "Shared-Bottom",
    "cross-stitch": "Cross-Stitch",
    "mmoe": "MMoE",
    "dselect-k": "DSelect-k",
    "ple": "PLE",
    "two-tower": "Two-tower",
    "backbone": "Backbone",
    "backbone-dal": "Backbone&DAL",
    "backbone-dal-uwl": "Backbone&DAL&UWL",
    "backbone-mvwdl": "Backbone&MVWDL",
    "backbone-rrl": "Backbone&RRL",
    "backbone-rrl-adv": "Backbone&RRL+Adv (NANN)",
}


# How the runner trains: in-process library calls or the operator-facing CLI (experiments/backends.py).
BackendName = Literal["library", "cli"]


class ExperimentConfigError(ValueError):
    """An experiment config file is missing, malformed or inconsistent."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DatasetSpec(_Frozen):
    """Where one dataset of the table comes from.

    ``source`` is ``synth`` (``unimatch data synth --preset PRESET --seed SEED``), ``import``
    (``unimatch data import IMPORTER``) or ``path`` (an existing dataset directory, used as is).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")  # also a directory name
    source: Literal["synth", "import", "path"]
    preset: SynthPreset | None = None
    seed: int = 0
    domains: int | None = None  # synth only: number of domains (default: the preset's)
    importer: ImportSource | None = None
    path: Path | None = None

    @model_validator(mode="after")
    def _source_fields(self) -> DatasetSpec:
        if self.source == "synth" and not self.preset:
            raise ValueError(f"dataset {self.name!r}: source 'synth' needs 'preset'")
        if self.source == "import" and not self.importer:
            raise ValueError(f"dataset {self.name!r}: source 'import' needs 'importer'")
        if self.source == "path" and self.path is None:
            raise ValueError(f"dataset {self.name!r}: source 'path' needs 'path'")
        return self


class TrainSpec(_Frozen):
    """The training budget, identical for every method of the table."""

    epochs: int | None = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1)  # caps epochs when both are set
    # Further keyword options of the trainer (batch size, negatives, embedding size ...), passed to
    # every method alike; empty means the trainer's defaults.
    options: dict[str, Any] = Field(default_factory=dict)
    threads: int | None = Field(default=None, ge=1)  # torch intra-op threads; None = torch default


class TuningSpec(_Frozen):
    """Learning-rate selection on the validation split: the same grid and budget for every method.

    Every (dataset, method) trains once per ``lrs`` value with ``seed`` and the table's budget and
    is scored by average validation Recall-all@``metric_n``; the best learning rate is then used
    for all of that method's seeds. A single-value grid means no tuning run at all.
    """

    lrs: list[float] = Field(min_length=1)
    metric_n: int = Field(default=50, ge=1)
    seed: int = 0

    @field_validator("lrs")
    @classmethod
    def _positive(cls, lrs: list[float]) -> list[float]:
        if any(lr <= 0 for lr in lrs):
            raise ValueError(f"learning rates must be > 0, got {lrs}")
        if len(set(lrs)) != len(lrs):
            raise ValueError(f"learning rates must be distinct, got {lrs}")
        return lrs


class EvalSpec(_Frozen):
    """Recall-all@N on the test split (Eq. 26), exhaustive scoring of the whole catalogue."""

    n: list[int] = Field(default_factory=lambda: [20, 50, 200], min_length=1)
    table_n: int = 50  # the N shown in the Table III / IV analogs (the paper's is 2000)
    max_users: int | None = Field(default=2000, ge=1)  # the paper evaluates 2,000 users

    @model_validator(mode="after")
    def _table_n_evaluated(self) -> EvalSpec:
        if any(n < 1 for n in self.n):
            raise ValueError(f"eval.n must be positive, got {self.n}")
        if self.table_n not in self.n:
            raise ValueError(f"eval.table_n={self.table_n} is not among eval.n={self.n}")
        return self


class ExperimentConfig(_Frozen):
    """One table: every (dataset, method, seed) of the grid is one run and one result file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    kind: Literal["comparison", "ablation"]  # Table III analog (vs DNN) or Table IV analog (vs Backbone)
    description: str = ""
    reference: str  # the method relative changes are computed against
    datasets: list[DatasetSpec] = Field(min_length=1)
    methods: list[str] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    train: TrainSpec = Field(default_factory=TrainSpec)
    tuning: TuningSpec
    eval: EvalSpec = Field(default_factory=EvalSpec)
    backend: BackendName = "library"
    # The method whose per-step training log feeds the Fig. 5 analog (UWL weights); None = no plot.
    uwl_method: str | None = "backbone-rrl"

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods repeat: {self.methods}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {self.seeds}")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names repeat: {names}")
        if self.reference not in self.methods:
            raise ValueError(f"reference method {self.reference!r} is not among methods {self.methods}")
        if self.uwl_method is not None and self.uwl_method not in self.methods:
            raise ValueError(f"uwl_method {self.uwl_method!r} is not among methods {self.methods}")
        if self.tuning.metric_n < 1:
            raise ValueError("tuning.metric_n must be >= 1")
        return self

    def fingerprint(self) -> str:
        """Hash of everything that changes a run's result except the grid axes themselves."""
        payload = {
            "train": self.train.model_dump(mode="json", exclude={"threads"}),
            "eval": self.eval.model_dump(mode="json", exclude={"table_n"}),
            "tuning": self.tuning.model_dump(mode="json"),  # it decides each method's learning rate
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: Path) -> ExperimentConfig:
    """Read and validate an experiment config (JSON). Raises ExperimentConfigError with one line."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentConfigError(f"experiment config {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExperimentConfigError(f"{path}: not valid JSON ({exc})") from exc
    return parse_config(raw, where=str(path))


def parse_config(raw: Any, *, where: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ExperimentConfigError(f"{where}: {loc}: {first['msg']}") from exc


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)
