"""The declared feature schema of the unified entity space (UMES, paper section IV-A, Table I).

One schema describes every dataset, model, bundle and feature store of UniMatch:

* user features: categorical and numeric profile fields (E_u) and a behaviour sequence of entity
  rows (E_seq) of at most ``max_seq_len`` items;
* entity features (E_a): *shared* columns that every entity type has, and *type-specific* columns
  (``applies_to``) that only some types carry; the others are filled with the column's declared
  default, so one model scores all entity types in one feature space;
* an entity-type indicator (E_ac) and a domain indicator (E_did); the entity identifier (E_aid) is
  the entity's row number.

Categorical values are integer codes in ``[0, cardinality)``; code 0 is reserved for
"unknown / missing" so that defaults and cold-start users need no special casing in the model.
The schema is saved as ``schema.json`` beside every dataset and inside every bundle, and validated
on load.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

SCHEMA_FORMAT_VERSION = 1


class SchemaError(ValueError):
    """A schema file is missing, malformed, or does not match the data it describes."""


class CategoricalFeature(BaseModel):
    """An integer-coded categorical column; code 0 means unknown/missing."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    cardinality: int = Field(ge=2, description="number of codes, including the reserved 0")
    default: int = Field(default=0, ge=0, description="code filled where the value is missing")
    applies_to: list[str] | None = Field(
        default=None, description="entity types carrying this column; None = every type (shared)"
    )

    # A multi-value column (an ad's tag list): up to `values` codes per row, in as many consecutive
    # columns of cat.npy, 0 = no value; the model mean-pools their embeddings. Entities only.
    values: int = Field(default=1, ge=1, le=64)

    @model_validator(mode="after")
    def _default_in_range(self) -> CategoricalFeature:
        if self.default >= self.cardinality:
            raise ValueError(f"default {self.default} of {self.name!r} is not below cardinality {self.cardinality}")
        if self.values > 1 and self.default != 0:
            raise ValueError(f"multi-value column {self.name!r}: default must be 0 (no value)")
        return self

    @model_serializer(mode="wrap")
    def _omit_single_value(self, handler: SerializerFunctionWrapHandler) -> Any:
        # single-value columns serialise as before, so every existing schema keeps its fingerprint
        out = handler(self)
        if isinstance(out, dict) and self.values == 1:
            out.pop("values", None)
        return out


def cat_slices(cols: list[CategoricalFeature]) -> list[slice]:
    """The cat.npy columns of each categorical feature: one, or ``values`` for a multi-value one."""
    out, start = [], 0
    for c in cols:
        out.append(slice(start, start + c.values))
        start += c.values
    return out


class NumericFeature(BaseModel):
    """A float column, expected roughly standardised (the loaders scale raw values)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    default: float = 0.0
    applies_to: list[str] | None = None


class FeatureSchema(BaseModel):
    """The single source of truth for feature layout, shared by data, model, export and service."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = SCHEMA_FORMAT_VERSION
    domains: list[str] = Field(min_length=1)
    entity_types: list[str] = Field(min_length=1)
    user_categorical: list[CategoricalFeature] = Field(default_factory=list)
    user_numeric: list[NumericFeature] = Field(default_factory=list)
    entity_categorical: list[CategoricalFeature] = Field(default_factory=list)
    entity_numeric: list[NumericFeature] = Field(default_factory=list)
    # 50 covers the recent history the paper's transformer sees while keeping attention cheap on CPU.
    max_seq_len: int = Field(default=50, ge=1, le=1024)
    # The fingerprint, computed once at construction (the schema is frozen): the feature store keys every
    # read with it, and hashing the schema's JSON per request cost more than the Redis key it names.
    _fingerprint: str = PrivateAttr(default="")

    @field_validator("domains", "entity_types")
    @classmethod
    def _unique_names(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError(f"names must be unique, got {names}")
        if any(not n or len(n) > 64 for n in names):
            raise ValueError("names must be 1..64 characters")
        return names

    @model_validator(mode="after")
    def _check_columns(self) -> FeatureSchema:
        if self.format_version != SCHEMA_FORMAT_VERSION:
            raise ValueError(f"schema format_version {self.format_version} is not {SCHEMA_FORMAT_VERSION}")
        for group in ("user_categorical", "user_numeric", "entity_categorical", "entity_numeric"):
            cols = getattr(self, group)
            names = [c.name for c in cols]
            if len(set(names)) != len(names):
                raise ValueError(f"duplicate column names in {group}: {names}")
            for col in cols:
                if group == "user_categorical" and getattr(col, "values", 1) > 1:
                    raise ValueError(
                        f"user column {col.name!r}: multi-value columns are supported on entities only "
                        "(the user encoder takes one code per column)"
                    )
                if col.applies_to is None:
                    continue
                if group.startswith("user"):
                    raise ValueError(f"user column {col.name!r} cannot have applies_to")
                unknown = set(col.applies_to) - set(self.entity_types)
                if unknown:
                    raise ValueError(f"column {col.name!r} applies to unknown entity types {sorted(unknown)}")
        return self

    # ---- derived views -------------------------------------------------------------------------
    @property
    def num_domains(self) -> int:
        return len(self.domains)

    @property
    def num_entity_types(self) -> int:
        return len(self.entity_types)

    @property
    def entity_cat_width(self) -> int:
        """Columns of entities/cat.npy: a multi-value feature takes ``values`` of them."""
        return sum(c.values for c in self.entity_categorical)

    def domain_index(self, name: str) -> int:
        """Index of a domain name; raises SchemaError naming the valid ones."""
        try:
            return self.domains.index(name)
        except ValueError:
            raise SchemaError(f"unknown domain {name!r}; expected one of {self.domains}") from None

    def entity_type_index(self, name: str) -> int:
        try:
            return self.entity_types.index(name)
        except ValueError:
            raise SchemaError(f"unknown entity type {name!r}; expected one of {self.entity_types}") from None

    def model_post_init(self, context: Any, /) -> None:
        self._fingerprint = hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> FeatureSchema:
        """A copy with ``update`` applied, validated and fingerprinted anew (pydantic's own copy keeps
        the old fingerprint and skips validation)."""
        return FeatureSchema.model_validate({**self.model_dump(), **(update or {})})

    def fingerprint(self) -> str:
        """Stable hash of the schema: bundles, checkpoints and Redis keys carry it to detect mismatch."""
        return self._fingerprint

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.model_dump(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> FeatureSchema:
        if not path.is_file():
            raise SchemaError(f"{path}: schema file not found")
        try:
            return cls.model_validate_json(path.read_text())
        except ValueError as exc:  # pydantic.ValidationError and JSON errors are ValueErrors
            first = str(exc).splitlines()
            raise SchemaError(f"{path}: invalid schema: {' '.join(first[:3])}") from None
