"""Bring your own data: import a CSV/TSV/Parquet/JSONL interaction log into the UMES format via a mapping file.

A real user's ad log rarely looks like ours, so instead of a fixed input format a small mapping
file (JSON, or YAML when PyYAML is installed) says which column is what (paper section IV-A,
*Unified Modeling in Entity Space*: every entity type, feature and domain lands in one declared
schema). Paths in the mapping are relative to the mapping file::

    {
      "name": "my-ads",
      "domains": ["feed", "search", "video"],          # optional: fixes order; other labels are errors
      "entity_types": ["image", "video", "live"],      # optional likewise
      "interactions": {"file": "events.csv", "user": "user_id", "entity": "ad_id",
                       "domain": "placement", "timestamp": "ts"},
      "users": {"file": "users.csv", "id": "user_id",
                "categorical": ["gender", "age_group"], "numeric": ["tenure_days"]},
      "entities": {"file": "ads.csv", "id": "ad_id", "entity_type": "ad_type",
                   "categorical": ["category", {"column": "anchor_level", "applies_to": ["live"]}],
                   "numeric": ["price", {"column": "duration_s", "applies_to": ["video"], "default": 0}]},
      "split": {"n_test": 1, "n_valid": 1, "min_train": 1},
      "max_seq_len": 50
    }

Encoding (so that every loader produces the same shape of data):

* categorical values are read as strings and coded 1..n in sorted order; 0 is reserved for
  missing/unknown. A declared ``default`` (a raw value) is what missing and not-applicable rows get;
* numeric values are standardised ((x - mean) / std over the observed, applicable rows); missing
  values get the standardised ``default`` (the mean when none is declared);
* ``applies_to`` makes a column type-specific: rows of other entity types get its default;
* timestamps may be integers, floats, ISO-8601 strings or Parquet timestamps (stored as epoch
  seconds); without a timestamp column, file order is time;
* the split is leave-last-out per (user, domain) by time (``model.data.split``), unless the
  interactions name a ``split`` column (train / validation / test), which is then kept.

Newer keys (older mappings need none of them): per file ``format``, ``columns`` (header-less
CSV/TSV), ``delimiter``, ``na_values`` (only empty cells are missing by default); on the
interactions ``positive`` (``clk == 1``, ``rating >= 4 and src == "web"``: ``model.data.filters``)
and ``timestamp_format``; per feature ``type`` (a date/time turned into days since epoch, hour of
day...; ``model.data.tables.time_feature``) with ``time_format``, and ``separator`` /
``max_values`` for a multi-value entity column (a bag of codes); ``eligibility`` per domain by
entity type. docs/data.md has the table of every key.

The vocabularies and standardisation statistics go into the dataset manifest (``encodings``) so
that new raw values can be encoded the same way later. Every error names the file, the row (and
CSV line) or column, and what was expected.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from contracts.dataset import (
    MAX_DOMAINS,
    TEST,
    TRAIN,
    VALID,
    DatasetError,
    Entities,
    Interactions,
    Users,
    write_dataset,
)
from contracts.schema import CategoricalFeature, FeatureSchema, NumericFeature
from model.data.filters import FilterError, columns_of, evaluate_filter, parse_filter
from model.data.split import leave_last_out
from model.data.tables import TIME_KINDS, Table, time_feature

# ---- helpers shared by the importers (amazon, movielens, mapping) ---------------------------------


def standardise(values: np.ndarray, observed: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """(x - mean) / std with the statistics of the ``observed`` rows; returns (float32 values, mean, std).

    A constant column gets std 1 so it maps to zeros instead of dividing by zero.
    """
    x = np.asarray(values, dtype=np.float64)
    ref = x if observed is None else x[observed]
    mean = float(ref.mean()) if ref.size else 0.0
    std = float(ref.std()) if ref.size else 1.0
    if not np.isfinite(std) or std < 1e-12:
        std = 1.0
    return ((x - mean) / std).astype(np.float32), mean, std


def train_log_popularity(entity: np.ndarray, split: np.ndarray, num_entities: int) -> np.ndarray:
    """(E,) float32 standardised log(1 + number of TRAIN interactions) of each entity.

    Counted on training rows only, so the held-out validation and test interactions cannot leak into
    an entity feature the model sees.
    """
    counts = np.bincount(np.asarray(entity)[np.asarray(split) == TRAIN], minlength=num_entities)
    return standardise(np.log1p(counts.astype(np.float64)))[0]


# ---- the mapping file -----------------------------------------------------------------------------


# the names of model.data.tables.TIME_KINDS, spelled out for pydantic
TimeKind = Literal["epoch_seconds", "days_since_epoch", "hour_of_day", "day_of_week", "month", "year"]
FileFormat = Literal["csv", "tsv", "parquet", "jsonl"]


class FeatureSpec(BaseModel):
    """One feature column. A bare string in the mapping means ``{"column": that string}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    column: str = Field(min_length=1)
    name: str | None = Field(default=None, description="schema column name; default: the column, sanitised")
    applies_to: list[str] | None = Field(default=None, description="entity types carrying it; None = all")
    default: str | float | int | None = Field(default=None, description="raw value for missing / not applicable")
    # A date/time column read as a time and turned into this number (UTC). Without it a date column
    # is refused, since "2024-05-01" has no single obvious numeric meaning.
    type: TimeKind | None = None
    time_format: str | None = Field(default=None, description="strptime pattern of string times, e.g. %Y%m%d")
    # a multi-value categorical (entities): "a|b|c" is a bag of codes, mean-pooled by the model
    separator: str | None = Field(default=None, min_length=1, max_length=8)
    max_values: int | None = Field(default=None, ge=1, le=64, description="codes kept per row (the first ones)")

    @model_validator(mode="after")
    def _format_needs_type(self) -> FeatureSpec:
        if self.time_format is not None and self.type is None:
            raise ValueError(f'column {self.column!r}: "time_format" needs a "type" ({", ".join(TIME_KINDS)})')
        if self.separator is not None and (self.type is not None or self.default is not None):
            raise ValueError(f'column {self.column!r}: a multi-value column ("separator") takes no "type" or "default"')
        if self.max_values is not None and self.separator is None:
            raise ValueError(f'column {self.column!r}: "max_values" needs a "separator"')
        return self

    def schema_name(self) -> str:
        if self.name:
            return self.name
        name = re.sub(r"[^A-Za-z0-9_]", "_", self.column)
        return name if re.match(r"[A-Za-z_]", name) else f"_{name}"


def _features(value: list[str | FeatureSpec | dict[str, Any]]) -> list[FeatureSpec]:
    return [FeatureSpec(column=v) if isinstance(v, str) else FeatureSpec.model_validate(v) for v in value]


class FileSpec(BaseModel):
    """How to read one file: the format (default: from the extension), header, delimiter, nulls."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(min_length=1)
    format: FileFormat | None = None  # needed when the file has no (or a misleading) extension
    # column names of a header-less CSV/TSV: its first line is then data
    columns: list[str] | None = Field(default=None, min_length=1)
    delimiter: str | None = Field(default=None, min_length=1, max_length=1, description="CSV: ',' ; TSV: tab")
    # cells read as missing (CSV/TSV); only empty cells by default, so an id "NA" stays an id
    na_values: list[str] | None = None

    @field_validator("columns")
    @classmethod
    def _distinct(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            dup = sorted({c for c in v if v.count(c) > 1})
            raise ValueError(f"duplicate column names {dup}")
        return v


class TableSpec(FileSpec):
    """A users or entities table: one row per id, plus feature columns."""

    id: str = Field(min_length=1, description="the id column, matched against the interactions")
    categorical: list[FeatureSpec] = Field(default_factory=list)
    numeric: list[FeatureSpec] = Field(default_factory=list)
    # False lets a flat log (features repeated on every row) serve as its own table: first row wins.
    unique: bool = True

    @field_validator("categorical", "numeric", mode="before")
    @classmethod
    def _coerce(cls, v: Any) -> Any:
        return _features(v) if isinstance(v, list) else v

    @model_validator(mode="after")
    def _multi_is_categorical(self) -> TableSpec:
        for f in self.numeric:
            if f.separator is not None:
                raise ValueError(f'numeric column {f.column!r}: "separator" (a multi-value column) is for categorical ones')
        return self


class EntityTableSpec(TableSpec):
    entity_type: str | None = Field(default=None, description="column holding each entity's type")


class InteractionSpec(FileSpec):
    user: str = Field(min_length=1)
    entity: str = Field(min_length=1)
    domain: str | None = Field(default=None, description="domain label column; None = a single domain")
    timestamp: str | None = Field(default=None, description="time column; None = file order")
    entity_type: str | None = Field(default=None, description="entity type column, when there is no entities table")
    split: str | None = Field(default=None, description="a shipped split (train/validation/test), kept as is")
    timestamp_format: str | None = Field(default=None, description="strptime pattern of string timestamps")
    # which rows are positives, e.g. "clk == 1" or "rating >= 4" (model.data.filters); None = every row
    positive: str | None = None

    @field_validator("positive")
    @classmethod
    def _parses(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                parse_filter(v)
            except FilterError as exc:
                raise ValueError(f"cannot parse {v!r}: {exc}") from None
        return v


class SplitSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    n_test: int = Field(default=1, ge=0)
    n_valid: int = Field(default=1, ge=0)
    min_train: int = Field(default=1, ge=1)


class Mapping(BaseModel):
    """The parsed mapping file (see the module docstring for an example)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    interactions: InteractionSpec
    users: TableSpec | None = None
    entities: EntityTableSpec | None = None
    domains: list[str] | None = Field(default=None, min_length=1, max_length=MAX_DOMAINS)
    entity_types: list[str] | None = Field(default=None, min_length=1)
    # Used when neither an entities table nor the interactions name an entity type column.
    default_entity_type: str = "item"
    # "all": every entity may be shown in every domain; "observed": only where it has interactions;
    # or per domain: {"books": ["book"], "movies": "observed"} (entity types, "all" or "observed";
    # a domain not listed is "all")
    eligibility: Literal["all", "observed"] | dict[str, Literal["all", "observed"] | list[str]] = "all"
    # default of every table's na_values (a table's own na_values wins)
    na_values: list[str] | None = None
    split: SplitSpec = Field(default_factory=SplitSpec)
    max_seq_len: int = Field(default=50, ge=1, le=1024)


def load_mapping(path: Path) -> Mapping:
    """Parse and validate a mapping file (.json, or .yaml/.yml with PyYAML); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mapping file not found")
    text = path.read_text()
    if not text.strip():
        raise DatasetError(f"{path}: empty mapping file")
    if path.suffix.lower() in {".yaml", ".yml"}:
        try:
            import yaml
        except ModuleNotFoundError:
            raise DatasetError(
                f"{path}: YAML mappings need PyYAML (pip install pyyaml); or write the mapping as JSON"
            ) from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise DatasetError(f"{path}: invalid YAML ({' '.join(str(exc).split())})") from None
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected a mapping object at the top level, got {type(raw).__name__}")
    try:
        return Mapping.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise DatasetError(f"{path}: field {loc}: {err['msg']}") from None


def _index_of(values: np.ndarray, vocabulary: np.ndarray) -> np.ndarray:
    """Position of each value in ``vocabulary`` (unique), -1 where absent."""
    order = np.argsort(vocabulary)
    sorted_vocab = vocabulary[order]
    pos = np.searchsorted(sorted_vocab, values)
    pos = np.clip(pos, 0, max(len(sorted_vocab) - 1, 0))
    found = sorted_vocab[pos] == values if len(sorted_vocab) else np.zeros(len(values), dtype=bool)
    return np.where(found, order[pos], -1)


def _labels(
    values: np.ndarray, declared: list[str] | None, table: Table, column: str, what: str
) -> tuple[list[str], np.ndarray]:
    """Map string labels to indices into the declared (or sorted observed) label list."""
    values = values.astype(str)
    names = list(declared) if declared is not None else sorted(set(values.tolist()))
    idx = _index_of(values, np.asarray(names, dtype=str))
    if (idx < 0).any():
        row = int(np.flatnonzero(idx < 0)[0])
        raise DatasetError(
            f"{table.where(row)}: column {column!r}: unknown {what} {str(values[row])!r}; the mapping declares {names}"
        )
    return names, idx


# ---- features -----------------------------------------------------------------------------------


def _encode_features(
    table: Table,
    rows: np.ndarray,
    spec: TableSpec,
    group: str,
    entity_type: np.ndarray | None,
    type_names: list[str],
    mapping_path: Path,
) -> tuple[list[CategoricalFeature], list[NumericFeature], np.ndarray, np.ndarray, dict[str, Any]]:
    """Encode the table's feature columns for the selected ``rows`` (one per user/entity)."""
    n = rows.shape[0]
    encodings: dict[str, Any] = {}

    def applicable(f: FeatureSpec) -> np.ndarray:
        if f.applies_to is None:
            return np.ones(n, dtype=bool)
        if group == "users":
            raise DatasetError(
                f"{mapping_path}: users feature {f.column!r} cannot have applies_to (only entities have types)"
            )
        unknown = sorted(set(f.applies_to) - set(type_names))
        if unknown:
            raise DatasetError(
                f"{mapping_path}: feature {f.column!r} applies_to unknown entity types {unknown}; the data has {type_names}"
            )
        if entity_type is None:
            raise TypeError("entity features need the entity types")
        return np.isin(entity_type, [type_names.index(t) for t in f.applies_to])

    cat_cols: list[CategoricalFeature] = []
    blocks: list[np.ndarray] = []  # (n, 1) per single-value feature, (n, values) per multi-value one
    for f in spec.categorical:
        raw = _categorical_raw(table, f)[rows]
        keep = applicable(f)
        if f.separator is not None:
            if group == "users":
                raise DatasetError(
                    f"{mapping_path}: users feature {f.column!r}: multi-value columns (separator) are supported "
                    "on entities only"
                )
            block, feature, enc = _encode_multi(table, rows, raw, keep, f)
            blocks.append(block)
            cat_cols.append(feature)
            encodings[f"{group}.{f.schema_name()}"] = enc
            continue
        present = np.array([v is not None for v in raw], dtype=bool) & keep
        vocab = sorted(set(raw[present].astype(str).tolist()) | ({str(f.default)} if f.default is not None else set()))
        vocab_arr = np.asarray(vocab, dtype=str)
        default = vocab.index(str(f.default)) + 1 if f.default is not None else 0
        codes = np.full(n, default, dtype=np.int32)
        if present.any():
            codes[present] = _index_of(raw[present].astype(str), vocab_arr) + 1
        blocks.append(codes[:, None])
        cat_cols.append(
            CategoricalFeature(
                name=f.schema_name(), cardinality=len(vocab) + 1, default=default, applies_to=f.applies_to
            )
        )
        encodings[f"{group}.{f.schema_name()}"] = {
            "column": f.column,
            "vocabulary": vocab,
            **({"type": f.type} if f.type else {}),
        }

    cat = np.concatenate(blocks, axis=1).astype(np.int32) if blocks else np.zeros((n, 0), dtype=np.int32)

    num_cols: list[NumericFeature] = []
    num = np.zeros((n, len(spec.numeric)), dtype=np.float32)
    for j, f in enumerate(spec.numeric):
        raw_num = (time_feature(table.times(f.column, f.time_format), f.type) if f.type else table.numbers(f.column))[rows]
        keep = applicable(f)
        observed = np.isfinite(raw_num) & keep
        if f.default is not None:
            try:
                raw_default = float(f.default)
            except ValueError:
                raise DatasetError(
                    f"{mapping_path}: numeric feature {f.column!r}: default {f.default!r} is not a number"
                ) from None
        else:
            raw_default = float(raw_num[observed].mean()) if observed.any() else 0.0
        values = np.where(observed, raw_num, raw_default)
        scaled, mean, std = standardise(values, observed if observed.any() else None)
        default_scaled = float((raw_default - mean) / std)
        scaled[~observed] = default_scaled
        num[:, j] = scaled
        num_cols.append(NumericFeature(name=f.schema_name(), default=default_scaled, applies_to=f.applies_to))
        encodings[f"{group}.{f.schema_name()}"] = {
            "column": f.column,
            "mean": mean,
            "std": std,
            "default_raw": raw_default,
            **({"type": f.type} if f.type else {}),
        }
    return cat_cols, num_cols, cat, num, encodings


MAX_BAG = 64  # the schema's cap on the codes of one multi-value row


def _encode_multi(
    table: Table, rows: np.ndarray, raw: np.ndarray, keep: np.ndarray, f: FeatureSpec
) -> tuple[np.ndarray, CategoricalFeature, dict[str, Any]]:
    """A separator-joined tag list -> (n, L) codes, left-aligned, 0-padded; duplicates in a row count once."""
    sep = f.separator or "|"
    bags: list[list[str]] = []
    for v, k in zip(raw, keep, strict=True):
        if v is None or not k:
            bags.append([])
            continue
        seen: dict[str, None] = {}
        for tok in str(v).split(sep):
            tok = tok.strip()
            if tok:
                seen.setdefault(tok, None)
        bags.append(list(seen))
    longest = max((len(b) for b in bags), default=0)
    if f.max_values is None and longest > MAX_BAG:
        i = next(i for i, b in enumerate(bags) if len(b) == longest)
        raise DatasetError(
            f"{table.where(int(rows[i]))}: column {f.column!r}: {longest} values; at most {MAX_BAG} per row "
            f'are kept: declare "max_values" (<= {MAX_BAG}) to keep the first ones'
        )
    width = max(1, f.max_values if f.max_values is not None else longest)
    vocab = sorted({t for b in bags for t in b})
    index = {t: i + 1 for i, t in enumerate(vocab)}
    block = np.zeros((len(bags), width), dtype=np.int32)
    for i, b in enumerate(bags):
        for j, t in enumerate(b[:width]):  # max_values declared: the first ones are kept
            block[i, j] = index[t]
    feature = CategoricalFeature(name=f.schema_name(), cardinality=len(vocab) + 1, applies_to=f.applies_to, values=width)
    enc = {"column": f.column, "vocabulary": vocab, "separator": sep, "values": width}
    return block, feature, enc


def _categorical_raw(table: Table, f: FeatureSpec) -> np.ndarray:
    """Raw categorical values as strings (None = missing); a time column gives e.g. its hour "0".."23"."""
    if f.type is None:
        if f.time_format is not None:
            raise DatasetError(f'{table.path}: column {f.column!r}: "time_format" needs a "type" ({", ".join(TIME_KINDS)})')
        return table.strings(f.column, required=False)
    x = time_feature(table.times(f.column, f.time_format), f.type)
    return np.array([None if np.isnan(v) else str(int(v)) for v in x], dtype=object)


def _unique_rows(table: Table, ids: np.ndarray, spec: TableSpec) -> np.ndarray:
    """Row index of each distinct id, in first-occurrence order; duplicates are an error if ``unique``."""
    ids = ids.astype(str)
    _, first = np.unique(ids, return_index=True)
    if spec.unique and first.shape[0] != ids.shape[0]:
        dup = np.ones(ids.shape[0], dtype=bool)
        dup[first] = False
        row = int(np.flatnonzero(dup)[0])
        raise DatasetError(
            f'{table.where(row)}: column {spec.id!r}: duplicate id {str(ids[row])!r} (set "unique": false to keep the first row)'
        )
    return np.sort(first)


def _filter_numbers(table: Table, column: str) -> np.ndarray:
    x = table.numbers(column)
    if np.isnan(x).any():
        row = int(np.flatnonzero(np.isnan(x))[0])
        raise DatasetError(f"{table.where(row)}: column {column!r} is empty; the positive filter needs a value")
    return x


def _filter_strings(table: Table, column: str) -> np.ndarray:
    raw = table.strings(column, required=False)
    missing = np.array([v is None for v in raw], dtype=bool)
    if missing.any():
        row = int(np.flatnonzero(missing)[0])
        raise DatasetError(f"{table.where(row)}: column {column!r} is empty; the positive filter needs a value")
    return raw.astype(str)


def eligibility_mask(
    rule: str | dict[str, Any],
    domains: list[str],
    type_names: list[str],
    entity_type: np.ndarray,
    i_entity: np.ndarray,
    i_domain: np.ndarray,
    *,
    where: str,
) -> np.ndarray:
    """(E,) uint64 domain bits per entity from the mapping's ``eligibility``.

    ``"all"``; ``"observed"`` (where the entity has interactions; one with none anywhere stays
    eligible everywhere rather than nowhere); or per domain ``"all"``, ``"observed"`` (strictly: only
    entities seen in that domain) or a list of entity types. An unlisted domain is ``"all"``.
    """
    n_ent, K = entity_type.shape[0], len(domains)
    all_bits = np.uint64((1 << K) - 1) if K < 64 else np.uint64(np.iinfo(np.uint64).max)
    seen = np.zeros(n_ent, dtype=np.uint64)
    np.bitwise_or.at(seen, i_entity, np.uint64(1) << i_domain.astype(np.uint64))
    if rule == "all":
        return np.full(n_ent, all_bits, dtype=np.uint64)
    if rule == "observed":
        return np.where(seen > 0, seen, all_bits).astype(np.uint64)
    assert isinstance(rule, dict)  # the Mapping model admits nothing else
    unknown = sorted(set(rule) - set(domains))
    if unknown:
        raise DatasetError(f"{where}: eligibility names unknown domains {unknown}; the data has {domains}")
    mask = np.zeros(n_ent, dtype=np.uint64)
    for k, name in enumerate(domains):
        bit = np.uint64(1) << np.uint64(k)
        r = rule.get(name, "all")
        if r == "all":
            ok = np.ones(n_ent, dtype=bool)
        elif r == "observed":
            ok = (seen & bit) > 0
        else:
            bad = sorted(set(r) - set(type_names))
            if bad:
                raise DatasetError(
                    f"{where}: eligibility.{name}: unknown entity types {bad}; the data has {type_names}"
                )
            ok = np.isin(entity_type, [type_names.index(t) for t in r])
        if not ok.any():
            raise DatasetError(f"{where}: eligibility.{name}: no entity is eligible in domain {name!r}")
        mask[ok] |= bit
    return mask


# ---- the importer: one step per table -----------------------------------------------------------


@dataclass(frozen=True)
class _IdTable:
    """The users or the entities of an import: their ids in dataset row order, and where they came from."""

    table: Table | None  # the mapping's users/entities file; None = ids taken from the interactions
    rows: np.ndarray | None  # (n,) row in ``table`` of each id (its first row); None without a table
    ids: np.ndarray  # (n,) str, the external ids in dataset row order
    of_interaction: np.ndarray  # (N,) row in ``ids`` of each interaction's user / entity


def _read_interactions(m: Mapping, base: Path) -> tuple[Table, int]:
    """The interactions file, with only the rows the positive filter keeps; also the rows read in all."""
    spec = m.interactions
    inter_cols = [c for c in (spec.user, spec.entity, spec.domain, spec.entity_type, spec.split) if c]
    positive = parse_filter(spec.positive) if spec.positive else None
    # a filter column compared with strings is read as text ("007" stays "007")
    filter_text = {c for c, numeric in columns_of(positive)} - {c for c, numeric in columns_of(positive) if numeric} if positive else set()
    inter = Table(base / spec.file, spec, set(inter_cols) | filter_text, m.na_values)
    inter.require(inter_cols + ([spec.timestamp] if spec.timestamp else []), "named in the mapping's interactions")
    n_rows_read = len(inter)
    if positive is not None:
        inter.require([c for c, _ in columns_of(positive)], "named in the positive filter")
        keep = evaluate_filter(positive, lambda c: _filter_numbers(inter, c), lambda c: _filter_strings(inter, c))
        if not keep.any():
            raise DatasetError(f"{inter.path}: no row passes the positive filter {spec.positive!r} ({n_rows_read:,} rows read)")
        inter.filter_rows(keep)
    return inter, n_rows_read


def _domains(m: Mapping, inter: Table) -> tuple[list[str], np.ndarray]:
    """Domain names and the (N,) domain index of each interaction; one domain "all" without a column."""
    spec = m.interactions
    if spec.domain:
        domains, i_domain = _labels(inter.strings(spec.domain, required=True), m.domains, inter, spec.domain, "domain")
    else:
        domains, i_domain = (list(m.domains) if m.domains else ["all"]), np.zeros(len(inter), dtype=np.int64)
    if len(domains) > MAX_DOMAINS:
        raise DatasetError(f"{inter.path}: {len(domains)} domains; at most {MAX_DOMAINS} are supported")
    return domains, i_domain


def _users(m: Mapping, base: Path, inter: Table, i_user: np.ndarray) -> _IdTable:
    """The users: the mapping's users table (every interaction's user must be in it), else the distinct ids."""
    users_tab: Table | None = None
    u_rows: np.ndarray | None = None
    if m.users is not None:
        users_tab = Table(base / m.users.file, m.users, {m.users.id} | {f.column for f in m.users.categorical}, m.na_values)
        users_tab.require(
            [m.users.id] + [f.column for f in m.users.categorical + m.users.numeric], "named in the mapping's users"
        )
        u_ids_all = users_tab.strings(m.users.id, required=True).astype(str)
        u_rows = _unique_rows(users_tab, u_ids_all, m.users)
        user_ids = u_ids_all[u_rows]
    else:
        user_ids = np.unique(i_user)
    i_user_row = _index_of(i_user, user_ids)
    if (i_user_row < 0).any():
        row = int(np.flatnonzero(i_user_row < 0)[0])
        raise DatasetError(
            f"{inter.where(row)}: column {m.interactions.user!r}: user {str(i_user[row])!r} is not in {users_tab.path if users_tab else ''} "
            f"(column {m.users.id if m.users else ''!r}); every interaction's user must be listed there"
        )
    return _IdTable(users_tab, u_rows, user_ids, i_user_row)


def _entities(
    m: Mapping, base: Path, inter: Table, i_entity: np.ndarray
) -> tuple[_IdTable, tuple[list[str], np.ndarray] | None]:
    """The entities, like :func:`_users`; also (type names, (E,) type index) when the entities table has a type column."""
    ent_tab: Table | None = None
    e_rows: np.ndarray | None = None
    types: tuple[list[str], np.ndarray] | None = None
    if m.entities is not None:
        string_cols = {m.entities.id} | {f.column for f in m.entities.categorical}
        if m.entities.entity_type:
            string_cols.add(m.entities.entity_type)
        ent_tab = Table(base / m.entities.file, m.entities, string_cols, m.na_values)
        ent_tab.require(
            [m.entities.id]
            + ([m.entities.entity_type] if m.entities.entity_type else [])
            + [f.column for f in m.entities.categorical + m.entities.numeric],
            "named in the mapping's entities",
        )
        e_ids_all = ent_tab.strings(m.entities.id, required=True).astype(str)
        e_rows = _unique_rows(ent_tab, e_ids_all, m.entities)
        entity_ids = e_ids_all[e_rows]
        if m.entities.entity_type:
            type_names, t_idx = _labels(
                ent_tab.strings(m.entities.entity_type, required=True),
                m.entity_types,
                ent_tab,
                m.entities.entity_type,
                "entity type",
            )
            types = (type_names, t_idx[e_rows])
    else:
        entity_ids = np.unique(i_entity)
    i_entity_row = _index_of(i_entity, entity_ids)
    if (i_entity_row < 0).any():
        row = int(np.flatnonzero(i_entity_row < 0)[0])
        raise DatasetError(
            f"{inter.where(row)}: column {m.interactions.entity!r}: entity {str(i_entity[row])!r} is not in {ent_tab.path if ent_tab else ''} "
            f"(column {m.entities.id if m.entities else ''!r}); every interaction's entity must be listed there"
        )
    return _IdTable(ent_tab, e_rows, entity_ids, i_entity_row), types


def _entity_types(
    m: Mapping,
    mapping_path: Path,
    inter: Table,
    i_entity: np.ndarray,
    ents: _IdTable,
    from_table: tuple[list[str], np.ndarray] | None,
) -> tuple[list[str], np.ndarray]:
    """Type names and the (E,) int16 type of each entity.

    From the entities table's type column when it has one; else from the interactions' type column
    (one type per entity across its rows; an entity with no interaction gets ``default_entity_type``);
    else every entity is ``default_entity_type``.
    """
    spec = m.interactions
    n_ent = ents.ids.shape[0]
    if from_table is not None:
        type_names, e_type_raw = from_table
        return type_names, e_type_raw.astype(np.int16)
    i_entity_row = ents.of_interaction
    if spec.entity_type:
        type_names, i_type = _labels(
            inter.strings(spec.entity_type, required=True), m.entity_types, inter, spec.entity_type, "entity type"
        )
        e_type_raw = np.full(n_ent, -1, dtype=np.int64)
        e_type_raw[i_entity_row] = i_type
        conflict = e_type_raw[i_entity_row] != i_type
        if conflict.any():
            row = int(np.flatnonzero(conflict)[0])
            raise DatasetError(
                f"{inter.where(row)}: column {spec.entity_type!r}: entity {str(i_entity[row])!r} has type "
                f"{type_names[i_type[row]]!r} here but {type_names[e_type_raw[i_entity_row[row]]]!r} on another row"
            )
        unseen = e_type_raw < 0  # listed in the entities table but never in an interaction
        if unseen.any():
            if m.default_entity_type not in type_names:
                raise DatasetError(
                    f"{inter.path}: entity {str(ents.ids[np.flatnonzero(unseen)[0]])!r} has no interaction to take its type "
                    f"from and default_entity_type {m.default_entity_type!r} is not one of {type_names}"
                )
            e_type_raw[unseen] = type_names.index(m.default_entity_type)
        return type_names, e_type_raw.astype(np.int16)
    type_names = list(m.entity_types) if m.entity_types else [m.default_entity_type]
    if m.default_entity_type not in type_names:
        raise DatasetError(
            f"{mapping_path}: default_entity_type {m.default_entity_type!r} is not in entity_types {type_names}"
        )
    return type_names, np.full(n_ent, type_names.index(m.default_entity_type), dtype=np.int64).astype(np.int16)


# a shipped split column's labels (lower-cased) and their split codes
_SPLIT_LABELS = {"train": TRAIN, "validation": VALID, "valid": VALID, "test": TEST, "0": TRAIN, "1": VALID, "2": TEST}


def _time_and_split(
    m: Mapping, mapping_path: Path, inter: Table, i_user_row: np.ndarray, i_domain: np.ndarray, num_domains: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """(N,) int64 timestamps (file order without a column), (N,) int8 split, and the split policy's wording."""
    spec = m.interactions
    n_int = len(inter)
    if spec.timestamp_format and not spec.timestamp:
        raise DatasetError(f'{mapping_path}: interactions: "timestamp_format" needs a "timestamp" column')
    timestamp = (
        inter.timestamps(spec.timestamp, spec.timestamp_format) if spec.timestamp else np.arange(n_int, dtype=np.int64)
    )
    if spec.split:
        raw_split = np.char.lower(inter.strings(spec.split, required=True).astype(str))
        split = np.full(n_int, -1, dtype=np.int8)
        for label, code in _SPLIT_LABELS.items():
            split[raw_split == label] = code
        if (split < 0).any():
            row = int(np.flatnonzero(split < 0)[0])
            raise DatasetError(
                f"{inter.where(row)}: column {spec.split!r}: expected train, validation or test, got {str(raw_split[row])!r}"
            )
        return timestamp, split, f"shipped split kept (column {spec.split!r})"
    split = leave_last_out(
        i_user_row,
        i_domain,
        timestamp,
        num_domains=num_domains,
        n_test=m.split.n_test,
        n_valid=m.split.n_valid,
        min_train=m.split.min_train,
    )
    split_policy = (
        f"leave-last-out per (user, domain) by {'column ' + repr(spec.timestamp) if spec.timestamp else 'file order'}: "
        f"{m.split.n_test} test, {m.split.n_valid} validation; groups under "
        f"{m.split.n_test + m.split.n_valid + m.split.min_train} interactions stay in train"
    )
    return timestamp, split, split_policy


def _table_features(
    ids: _IdTable,
    spec: TableSpec | None,
    group: str,
    entity_type: np.ndarray | None,
    type_names: list[str],
    mapping_path: Path,
) -> tuple[list[CategoricalFeature], list[NumericFeature], np.ndarray, np.ndarray, dict[str, Any]]:
    """The encoded feature columns of a users/entities table; none (zero-width arrays) without one."""
    if spec is not None and ids.table is not None and ids.rows is not None:
        return _encode_features(ids.table, ids.rows, spec, group, entity_type, type_names, mapping_path)
    n = ids.ids.shape[0]
    return [], [], np.zeros((n, 0), np.int32), np.zeros((n, 0), np.float32), {}


def import_mapping(mapping_path: Path, out: Path) -> Path:
    """Import the CSV/Parquet files a mapping file describes into a dataset at ``out`` (atomically).

    The steps, each its own function: the interactions (positive rows only), their domains, the
    users, the entities and their types, time and split, eligibility, then the features of the users
    and entities tables and the schema they make.
    """
    mapping_path = Path(mapping_path)
    m = load_mapping(mapping_path)
    base = mapping_path.parent
    spec = m.interactions

    inter, n_rows_read = _read_interactions(m, base)
    i_user = inter.strings(spec.user, required=True).astype(str)
    i_entity = inter.strings(spec.entity, required=True).astype(str)
    n_int = len(inter)
    domains, i_domain = _domains(m, inter)
    users = _users(m, base, inter, i_user)
    ents, types_from_table = _entities(m, base, inter, i_entity)
    type_names, entity_type = _entity_types(m, mapping_path, inter, i_entity, ents, types_from_table)
    timestamp, split, split_policy = _time_and_split(m, mapping_path, inter, users.of_interaction, i_domain, len(domains))
    domain_mask = eligibility_mask(
        m.eligibility, domains, type_names, entity_type, ents.of_interaction, i_domain, where=str(mapping_path)
    )

    ucat_cols, unum_cols, ucat, unum, u_enc = _table_features(users, m.users, "users", None, type_names, mapping_path)
    ecat_cols, enum_cols, ecat, enum, e_enc = _table_features(
        ents, m.entities, "entities", entity_type, type_names, mapping_path
    )
    encodings: dict[str, Any] = {**u_enc, **e_enc}
    try:
        schema = FeatureSchema(
            domains=domains,
            entity_types=type_names,
            user_categorical=ucat_cols,
            user_numeric=unum_cols,
            entity_categorical=ecat_cols,
            entity_numeric=enum_cols,
            max_seq_len=m.max_seq_len,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        raise DatasetError(f"{mapping_path}: the mapping gives an invalid schema: {err['msg']}") from None

    return write_dataset(
        Path(out),
        schema=schema,
        users=Users(external_id=users.ids.astype(str), cat=ucat, num=unum),
        entities=Entities(
            external_id=ents.ids.astype(str), entity_type=entity_type, cat=ecat, num=enum, domain_mask=domain_mask
        ),
        interactions=Interactions(
            user=users.of_interaction.astype(np.int32),
            entity=ents.of_interaction.astype(np.int32),
            domain=i_domain.astype(np.int16),
            timestamp=timestamp,
            split=split,
        ),
        meta={
            "source": "mapping",
            **({"dataset_name": m.name} if m.name else {}),
            "mapping": str(mapping_path.resolve()),
            "source_files": [str(t.path.resolve()) for t in (inter, users.table, ents.table) if t is not None],
            "time": f"column {spec.timestamp!r} as epoch seconds"
            if spec.timestamp
            else "no time column: file order used as time",
            "split_policy": split_policy,
            "eligibility": m.eligibility,
            "positive": {"filter": spec.positive, "rows_read": n_rows_read, "rows_kept": n_int}
            if spec.positive
            else None,
            "encodings": encodings,
        },
    )
