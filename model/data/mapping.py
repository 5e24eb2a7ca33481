"""Bring your own data: import a CSV/Parquet interaction log into the UMES format via a mapping file.

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

The vocabularies and standardisation statistics go into the dataset manifest (``encodings``) so
that new raw values can be encoded the same way later. Every error names the file, the row (and
CSV line) or column, and what was expected.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from model.data.dataset import (
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
from model.data.schema import CategoricalFeature, FeatureSchema, NumericFeature
from model.data.split import leave_last_out

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


class FeatureSpec(BaseModel):
    """One feature column. A bare string in the mapping means ``{"column": that string}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    column: str = Field(min_length=1)
    name: str | None = Field(default=None, description="schema column name; default: the column, sanitised")
    applies_to: list[str] | None = Field(default=None, description="entity types carrying it; None = all")
    default: str | float | int | None = Field(default=None, description="raw value for missing / not applicable")

    def schema_name(self) -> str:
        if self.name:
            return self.name
        name = re.sub(r"[^A-Za-z0-9_]", "_", self.column)
        return name if re.match(r"[A-Za-z_]", name) else f"_{name}"


def _features(value: list[str | FeatureSpec | dict[str, Any]]) -> list[FeatureSpec]:
    return [FeatureSpec(column=v) if isinstance(v, str) else FeatureSpec.model_validate(v) for v in value]


class TableSpec(BaseModel):
    """A users or entities table: one row per id, plus feature columns."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(min_length=1)
    id: str = Field(min_length=1, description="the id column, matched against the interactions")
    categorical: list[FeatureSpec] = Field(default_factory=list)
    numeric: list[FeatureSpec] = Field(default_factory=list)
    # False lets a flat log (features repeated on every row) serve as its own table: first row wins.
    unique: bool = True

    @field_validator("categorical", "numeric", mode="before")
    @classmethod
    def _coerce(cls, v: Any) -> Any:
        return _features(v) if isinstance(v, list) else v


class EntityTableSpec(TableSpec):
    entity_type: str | None = Field(default=None, description="column holding each entity's type")


class InteractionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(min_length=1)
    user: str = Field(min_length=1)
    entity: str = Field(min_length=1)
    domain: str | None = Field(default=None, description="domain label column; None = a single domain")
    timestamp: str | None = Field(default=None, description="time column; None = file order")
    entity_type: str | None = Field(default=None, description="entity type column, when there is no entities table")
    split: str | None = Field(default=None, description="a shipped split (train/validation/test), kept as is")


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
    # "all": every entity may be shown in every domain; "observed": only where it has interactions.
    eligibility: Literal["all", "observed"] = "all"
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


# ---- reading tables -------------------------------------------------------------------------------


class _Table:
    """A CSV/Parquet file read with pyarrow, with error messages that name the file, row and column."""

    def __init__(self, path: Path, string_columns: set[str]) -> None:
        try:
            import pyarrow as pa
            import pyarrow.csv as pacsv
            import pyarrow.parquet as pq
        except ModuleNotFoundError:
            raise DatasetError(f"{path}: reading CSV/Parquet needs pyarrow (pip install 'unimatch[train]')") from None

        self.path = path
        suffix = path.suffix.lower()
        self.is_csv = suffix in {".csv", ".tsv", ".txt"}
        if not self.is_csv and suffix not in {".parquet", ".pq"}:
            raise DatasetError(f"{path}: unsupported file type {suffix!r}; expected .csv, .tsv or .parquet")
        if not path.is_file():
            raise DatasetError(f"{path}: file not found")
        if path.stat().st_size == 0:
            raise DatasetError(f"{path}: empty file")
        try:
            if self.is_csv:
                self.table = pacsv.read_csv(
                    path,
                    parse_options=pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","),
                    # ids and labels stay strings: "007" and "7" are different ids
                    convert_options=pacsv.ConvertOptions(
                        column_types={c: pa.string() for c in string_columns}, strings_can_be_null=True
                    ),
                )
            else:
                self.table = pq.read_table(path)
        except pa.ArrowInvalid as exc:
            raise DatasetError(f"{path}: cannot read ({' '.join(str(exc).split())})") from None
        if self.table.num_rows == 0:
            raise DatasetError(f"{path}: no data rows")

    def __len__(self) -> int:
        return int(self.table.num_rows)

    def where(self, row: int) -> str:
        """``file: row N (line M)``: 1-based data row, and the CSV line counting the header."""
        return f"{self.path}: row {row + 1}" + (f" (line {row + 2})" if self.is_csv else "")

    def require(self, columns: list[str], role: str) -> None:
        have = self.table.column_names
        for c in columns:
            if c not in have:
                raise DatasetError(f"{self.path}: missing column {c!r} ({role}); the file has columns {have}")

    def strings(self, column: str, *, required: bool) -> np.ndarray:
        """Column as a numpy str array; None where null. ``required`` makes a null an error."""
        import pyarrow as pa
        import pyarrow.compute as pc

        col = self.table.column(column)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            if pa.types.is_floating(col.type):
                # 3.0 -> "3": ids and labels written as floats (a CSV column with a gap) still match
                whole = pc.equal(col, pc.floor(col))
                if pc.all(pc.fill_null(whole, True)).as_py():
                    col = pc.cast(col, pa.int64())
            try:
                col = pc.cast(col, pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise DatasetError(
                    f"{self.path}: column {column!r}: expected text or numbers, got {col.type}"
                ) from None
        if required and col.null_count:
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise DatasetError(f"{self.where(row)}: column {column!r} is empty; expected a value")
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)

    def numbers(self, column: str) -> np.ndarray:
        """Column as float64 with NaN for missing; a non-numeric value is an error naming its row."""
        import pyarrow as pa
        import pyarrow.compute as pc

        col = self.table.column(column)
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
            return np.asarray(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            raw = col.to_pylist()
            out = np.empty(len(raw), dtype=np.float64)
            for i, v in enumerate(raw):
                try:
                    out[i] = np.nan if v is None or v == "" else float(v)
                except ValueError:
                    raise DatasetError(f"{self.where(i)}: column {column!r}: expected a number, got {v!r}") from None
            return out
        raise DatasetError(f"{self.path}: column {column!r}: expected numbers, got values of type {col.type}")

    def timestamps(self, column: str) -> np.ndarray:
        """Column as int64 epoch seconds: integers, floats, ISO-8601 strings or Parquet timestamps."""
        import pyarrow as pa
        import pyarrow.compute as pc

        col = self.table.column(column)
        if col.null_count:
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise DatasetError(f"{self.where(row)}: column {column!r} is empty; expected a timestamp")
        if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
            tz = col.type.tz if pa.types.is_timestamp(col.type) else None
            # safe=False truncates sub-second precision instead of refusing it; epoch seconds are UTC
            secs = pc.cast(pc.cast(col, pa.timestamp("s", tz=tz), safe=False), pa.int64())
            return np.asarray(secs.to_numpy(zero_copy_only=False), dtype=np.int64)
        if pa.types.is_integer(col.type):
            return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.int64)
        if pa.types.is_floating(col.type):
            x = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
            if not np.isfinite(x).all():
                row = int(np.flatnonzero(~np.isfinite(x))[0])
                raise DatasetError(f"{self.where(row)}: column {column!r}: expected a finite timestamp, got {x[row]}")
            return np.rint(x).astype(np.int64)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            out = np.empty(len(col), dtype=np.int64)
            for i, v in enumerate(col.to_pylist()):
                t = _parse_time(v)
                if t is None:
                    raise DatasetError(
                        f"{self.where(i)}: column {column!r}: expected a number or an ISO-8601 time, got {v!r}"
                    )
                out[i] = t
            return out
        raise DatasetError(f"{self.path}: column {column!r}: expected timestamps, got values of type {col.type}")


def _parse_time(value: str) -> int | None:
    """Epoch seconds of a numeric or ISO-8601 string; None when it is neither."""
    try:
        return int(round(float(value)))
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)  # naive times are read as UTC, the usual log convention
    return int(t.timestamp())


def _index_of(values: np.ndarray, vocabulary: np.ndarray) -> np.ndarray:
    """Position of each value in ``vocabulary`` (unique), -1 where absent."""
    order = np.argsort(vocabulary)
    sorted_vocab = vocabulary[order]
    pos = np.searchsorted(sorted_vocab, values)
    pos = np.clip(pos, 0, max(len(sorted_vocab) - 1, 0))
    found = sorted_vocab[pos] == values if len(sorted_vocab) else np.zeros(len(values), dtype=bool)
    return np.where(found, order[pos], -1)


def _labels(
    values: np.ndarray, declared: list[str] | None, table: _Table, column: str, what: str
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
    table: _Table,
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
    cat = np.zeros((n, len(spec.categorical)), dtype=np.int32)
    for j, f in enumerate(spec.categorical):
        raw = table.strings(f.column, required=False)[rows]
        keep = applicable(f)
        present = np.array([v is not None for v in raw], dtype=bool) & keep
        vocab = sorted(set(raw[present].astype(str).tolist()) | ({str(f.default)} if f.default is not None else set()))
        vocab_arr = np.asarray(vocab, dtype=str)
        default = vocab.index(str(f.default)) + 1 if f.default is not None else 0
        codes = np.full(n, default, dtype=np.int32)
        if present.any():
            codes[present] = _index_of(raw[present].astype(str), vocab_arr) + 1
        cat[:, j] = codes
        cat_cols.append(
            CategoricalFeature(
                name=f.schema_name(), cardinality=len(vocab) + 1, default=default, applies_to=f.applies_to
            )
        )
        encodings[f"{group}.{f.schema_name()}"] = {"column": f.column, "vocabulary": vocab}

    num_cols: list[NumericFeature] = []
    num = np.zeros((n, len(spec.numeric)), dtype=np.float32)
    for j, f in enumerate(spec.numeric):
        raw_num = table.numbers(f.column)[rows]
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
        }
    return cat_cols, num_cols, cat, num, encodings


def _unique_rows(table: _Table, ids: np.ndarray, spec: TableSpec) -> np.ndarray:
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


# ---- the importer -------------------------------------------------------------------------------


def import_mapping(mapping_path: Path, out: Path) -> Path:
    """Import the CSV/Parquet files a mapping file describes into a dataset at ``out`` (atomically)."""
    mapping_path = Path(mapping_path)
    m = load_mapping(mapping_path)
    base = mapping_path.parent
    spec = m.interactions

    inter_cols = [c for c in (spec.user, spec.entity, spec.domain, spec.entity_type, spec.split) if c]
    inter = _Table(base / spec.file, set(inter_cols))
    inter.require(inter_cols + ([spec.timestamp] if spec.timestamp else []), "named in the mapping's interactions")
    i_user = inter.strings(spec.user, required=True).astype(str)
    i_entity = inter.strings(spec.entity, required=True).astype(str)
    n_int = len(inter)

    # domains
    if spec.domain:
        domains, i_domain = _labels(inter.strings(spec.domain, required=True), m.domains, inter, spec.domain, "domain")
    else:
        domains, i_domain = (list(m.domains) if m.domains else ["all"]), np.zeros(n_int, dtype=np.int64)
    if len(domains) > MAX_DOMAINS:
        raise DatasetError(f"{inter.path}: {len(domains)} domains; at most {MAX_DOMAINS} are supported")

    # users
    users_tab: _Table | None = None
    if m.users is not None:
        users_tab = _Table(base / m.users.file, {m.users.id} | {f.column for f in m.users.categorical})
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
            f"{inter.where(row)}: column {spec.user!r}: user {str(i_user[row])!r} is not in {users_tab.path if users_tab else ''} "
            f"(column {m.users.id if m.users else ''!r}); every interaction's user must be listed there"
        )

    # entities and their types
    ent_tab: _Table | None = None
    e_type_raw: np.ndarray | None = None
    if m.entities is not None:
        string_cols = {m.entities.id} | {f.column for f in m.entities.categorical}
        if m.entities.entity_type:
            string_cols.add(m.entities.entity_type)
        ent_tab = _Table(base / m.entities.file, string_cols)
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
            e_type_raw = t_idx[e_rows]
    else:
        entity_ids = np.unique(i_entity)
    i_entity_row = _index_of(i_entity, entity_ids)
    if (i_entity_row < 0).any():
        row = int(np.flatnonzero(i_entity_row < 0)[0])
        raise DatasetError(
            f"{inter.where(row)}: column {spec.entity!r}: entity {str(i_entity[row])!r} is not in {ent_tab.path if ent_tab else ''} "
            f"(column {m.entities.id if m.entities else ''!r}); every interaction's entity must be listed there"
        )
    n_ent = entity_ids.shape[0]
    if e_type_raw is None and spec.entity_type:
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
                    f"{inter.path}: entity {str(entity_ids[np.flatnonzero(unseen)[0]])!r} has no interaction to take its type "
                    f"from and default_entity_type {m.default_entity_type!r} is not one of {type_names}"
                )
            e_type_raw[unseen] = type_names.index(m.default_entity_type)
    if e_type_raw is None:
        type_names = list(m.entity_types) if m.entity_types else [m.default_entity_type]
        if m.default_entity_type not in type_names:
            raise DatasetError(
                f"{mapping_path}: default_entity_type {m.default_entity_type!r} is not in entity_types {type_names}"
            )
        e_type_raw = np.full(n_ent, type_names.index(m.default_entity_type), dtype=np.int64)
    entity_type = e_type_raw.astype(np.int16)

    # time and split
    timestamp = inter.timestamps(spec.timestamp) if spec.timestamp else np.arange(n_int, dtype=np.int64)
    K = len(domains)
    if spec.split:
        split_names = {
            "train": TRAIN,
            "validation": VALID,
            "valid": VALID,
            "test": TEST,
            "0": TRAIN,
            "1": VALID,
            "2": TEST,
        }
        raw_split = np.char.lower(inter.strings(spec.split, required=True).astype(str))
        split = np.full(n_int, -1, dtype=np.int8)
        for label, code in split_names.items():
            split[raw_split == label] = code
        if (split < 0).any():
            row = int(np.flatnonzero(split < 0)[0])
            raise DatasetError(
                f"{inter.where(row)}: column {spec.split!r}: expected train, validation or test, got {str(raw_split[row])!r}"
            )
        split_policy = f"shipped split kept (column {spec.split!r})"
    else:
        split = leave_last_out(
            i_user_row,
            i_domain,
            timestamp,
            num_domains=K,
            n_test=m.split.n_test,
            n_valid=m.split.n_valid,
            min_train=m.split.min_train,
        )
        split_policy = (
            f"leave-last-out per (user, domain) by {'column ' + repr(spec.timestamp) if spec.timestamp else 'file order'}: "
            f"{m.split.n_test} test, {m.split.n_valid} validation when >= {m.split.min_train} stay in train"
        )

    # eligibility
    all_bits = np.uint64((1 << K) - 1) if K < 64 else np.uint64(np.iinfo(np.uint64).max)
    domain_mask = np.full(n_ent, all_bits, dtype=np.uint64)
    if m.eligibility == "observed":
        seen = np.zeros(n_ent, dtype=np.uint64)
        np.bitwise_or.at(seen, i_entity_row, np.uint64(1) << i_domain.astype(np.uint64))
        # an entity with no interaction at all stays eligible everywhere rather than nowhere
        domain_mask = np.where(seen > 0, seen, all_bits).astype(np.uint64)

    # features
    encodings: dict[str, Any] = {}
    if m.users is not None and users_tab is not None:
        ucat_cols, unum_cols, ucat, unum, enc = _encode_features(
            users_tab, u_rows, m.users, "users", None, type_names, mapping_path
        )
        encodings.update(enc)
    else:
        ucat_cols, unum_cols = [], []
        ucat, unum = np.zeros((len(user_ids), 0), np.int32), np.zeros((len(user_ids), 0), np.float32)
    if m.entities is not None and ent_tab is not None:
        ecat_cols, enum_cols, ecat, enum, enc = _encode_features(
            ent_tab, e_rows, m.entities, "entities", entity_type, type_names, mapping_path
        )
        encodings.update(enc)
    else:
        ecat_cols, enum_cols = [], []
        ecat, enum = np.zeros((n_ent, 0), np.int32), np.zeros((n_ent, 0), np.float32)

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
        users=Users(external_id=user_ids.astype(str), cat=ucat, num=unum),
        entities=Entities(
            external_id=entity_ids.astype(str), entity_type=entity_type, cat=ecat, num=enum, domain_mask=domain_mask
        ),
        interactions=Interactions(
            user=i_user_row.astype(np.int32),
            entity=i_entity_row.astype(np.int32),
            domain=i_domain.astype(np.int16),
            timestamp=timestamp,
            split=split,
        ),
        meta={
            "source": "mapping",
            **({"dataset_name": m.name} if m.name else {}),
            "mapping": str(mapping_path.resolve()),
            "source_files": [str(t.path.resolve()) for t in (inter, users_tab, ent_tab) if t is not None],
            "time": f"column {spec.timestamp!r} as epoch seconds"
            if spec.timestamp
            else "no time column: file order used as time",
            "split_policy": split_policy,
            "eligibility": m.eligibility,
            "encodings": encodings,
        },
    )
