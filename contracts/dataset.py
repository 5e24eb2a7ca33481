"""The one on-disk dataset format of UniMatch: numpy arrays plus a JSON manifest.

Why numpy + JSON rather than Parquet: every consumer (trainer, evaluator, feature loader, the
service's embedded feature store) wants whole columns as arrays, and ``.npy`` files load with
``numpy.load(mmap_mode="r")`` with zero copies and no extra dependency on the serving path, so a
10M-interaction dataset opens in milliseconds. Importers that read CSV/Parquet convert once.

Layout of a dataset directory::

    schema.json                      FeatureSchema (contracts.schema)
    dataset.json                     manifest: name, source, counts, per-file sha256, split policy
    users/external_id.npy            (U,)  str   the user ids callers use
    users/cat.npy                    (U, Cu) int32 categorical profile codes (0 = unknown)
    users/num.npy                    (U, Cn) float32 numeric profile values
    entities/external_id.npy         (E,)  str
    entities/entity_type.npy         (E,)  int16  index into schema.entity_types
    entities/cat.npy                 (E, Ce) int32 (type-specific columns hold their default where absent)
    entities/num.npy                 (E, Cn) float32
    entities/domain_mask.npy         (E,)  uint64 bit k set = entity may be shown in domain k
    interactions/user.npy            (I,)  int32  user row
    interactions/entity.npy          (I,)  int32  entity row
    interactions/domain.npy          (I,)  int16
    interactions/timestamp.npy       (I,)  int64  (sorted by user, then timestamp)
    interactions/split.npy           (I,)  int8   0 train, 1 validation, 2 test

Interactions are sorted by (user, timestamp, original order) so that a user's history is one
contiguous slice: the behaviour sequence before interaction ``p`` is the slice that ends at ``p``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from contracts.io import atomic_directory, atomic_write_json, sha256_file
from contracts.schema import FeatureSchema, SchemaError, cat_slices

DATASET_FORMAT_VERSION = 1
TRAIN, VALID, TEST = 0, 1, 2
SPLIT_NAMES = {TRAIN: "train", VALID: "validation", TEST: "test"}
MAX_DOMAINS = 64  # domain_mask is a uint64 bitmask
PAD = -1  # padding value of behaviour sequences (entity rows are >= 0)


class DatasetError(ValueError):
    """A dataset directory is missing, incomplete, or inconsistent with its schema."""


@dataclass(frozen=True)
class Users:
    external_id: np.ndarray  # (U,) str
    cat: np.ndarray  # (U, Cu) int32
    num: np.ndarray  # (U, Cn) float32

    def __len__(self) -> int:
        return int(self.external_id.shape[0])


@dataclass(frozen=True)
class Entities:
    external_id: np.ndarray  # (E,) str
    entity_type: np.ndarray  # (E,) int16
    cat: np.ndarray  # (E, Ce) int32
    num: np.ndarray  # (E, Cn) float32
    domain_mask: np.ndarray  # (E,) uint64

    def __len__(self) -> int:
        return int(self.external_id.shape[0])

    def in_domain(self, domain: int) -> np.ndarray:
        """Boolean mask of entities eligible in ``domain``."""
        return (self.domain_mask & np.uint64(1 << domain)) != 0


@dataclass(frozen=True)
class Interactions:
    user: np.ndarray  # (I,) int32
    entity: np.ndarray  # (I,) int32
    domain: np.ndarray  # (I,) int16
    timestamp: np.ndarray  # (I,) int64
    split: np.ndarray  # (I,) int8

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def user_offsets(self, num_users: int) -> np.ndarray:
        """CSR offsets: user u's interactions are rows ``offsets[u]:offsets[u+1]`` (sorted by time)."""
        counts = np.bincount(self.user, minlength=num_users)
        offsets = np.zeros(num_users + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return offsets


@dataclass(frozen=True)
class Dataset:
    root: Path
    schema: FeatureSchema
    users: Users
    entities: Entities
    interactions: Interactions
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.root.name))


_FILES: dict[str, tuple[str, str]] = {
    # key -> (relative path, dtype kind check)
    "users.external_id": ("users/external_id.npy", "U"),
    "users.cat": ("users/cat.npy", "int32"),
    "users.num": ("users/num.npy", "float32"),
    "entities.external_id": ("entities/external_id.npy", "U"),
    "entities.entity_type": ("entities/entity_type.npy", "int16"),
    "entities.cat": ("entities/cat.npy", "int32"),
    "entities.num": ("entities/num.npy", "float32"),
    "entities.domain_mask": ("entities/domain_mask.npy", "uint64"),
    "interactions.user": ("interactions/user.npy", "int32"),
    "interactions.entity": ("interactions/entity.npy", "int32"),
    "interactions.domain": ("interactions/domain.npy", "int16"),
    "interactions.timestamp": ("interactions/timestamp.npy", "int64"),
    "interactions.split": ("interactions/split.npy", "int8"),
}


def sort_interactions(inter: Interactions) -> Interactions:
    """Return interactions sorted by (user, timestamp), stable in the original order."""
    order = np.lexsort((inter.timestamp, inter.user))
    if np.all(order[1:] > order[:-1]):
        return inter
    return Interactions(
        user=inter.user[order],
        entity=inter.entity[order],
        domain=inter.domain[order],
        timestamp=inter.timestamp[order],
        split=inter.split[order],
    )


def _as_arrays(users: Users, entities: Entities, inter: Interactions) -> dict[str, np.ndarray]:
    return {
        "users.external_id": np.asarray(users.external_id).astype(str),
        "users.cat": np.ascontiguousarray(users.cat, dtype=np.int32),
        "users.num": np.ascontiguousarray(users.num, dtype=np.float32),
        "entities.external_id": np.asarray(entities.external_id).astype(str),
        "entities.entity_type": np.ascontiguousarray(entities.entity_type, dtype=np.int16),
        "entities.cat": np.ascontiguousarray(entities.cat, dtype=np.int32),
        "entities.num": np.ascontiguousarray(entities.num, dtype=np.float32),
        "entities.domain_mask": np.ascontiguousarray(entities.domain_mask, dtype=np.uint64),
        "interactions.user": np.ascontiguousarray(inter.user, dtype=np.int32),
        "interactions.entity": np.ascontiguousarray(inter.entity, dtype=np.int32),
        "interactions.domain": np.ascontiguousarray(inter.domain, dtype=np.int16),
        "interactions.timestamp": np.ascontiguousarray(inter.timestamp, dtype=np.int64),
        "interactions.split": np.ascontiguousarray(inter.split, dtype=np.int8),
    }


def write_dataset(
    out: Path,
    *,
    schema: FeatureSchema,
    users: Users,
    entities: Entities,
    interactions: Interactions,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Validate and write a dataset atomically to ``out``; returns ``out``.

    The arrays are checked against the schema *before* anything is written, so an invalid dataset
    never reaches disk.
    """
    interactions = sort_interactions(interactions)
    arrays = _as_arrays(users, entities, interactions)
    validate_arrays(schema, arrays, where=str(out))
    out = Path(out)
    manifest: dict[str, Any] = {
        "format_version": DATASET_FORMAT_VERSION,
        "name": out.name,
        **(meta or {}),
        "schema_fingerprint": schema.fingerprint(),
        "counts": {
            "users": int(arrays["users.cat"].shape[0]),
            "entities": int(arrays["entities.cat"].shape[0]),
            "interactions": int(arrays["interactions.user"].shape[0]),
        },
        "files": {},
    }
    with atomic_directory(out, marker="dataset.json") as tmp:  # never replaces a foreign directory
        for key, (rel, _) in _FILES.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, arrays[key], allow_pickle=False)
            manifest["files"][rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        schema.save(tmp / "schema.json")
        atomic_write_json(tmp / "dataset.json", manifest)
    return out


def validate_arrays(schema: FeatureSchema, a: dict[str, np.ndarray], *, where: str) -> None:
    """Check shapes, dtypes and value ranges against the schema; raise DatasetError naming the column."""

    def fail(msg: str) -> None:
        raise DatasetError(f"{where}: {msg}")

    n_users = a["users.external_id"].shape[0]
    n_ent = a["entities.external_id"].shape[0]
    n_int = a["interactions.user"].shape[0]
    if n_users == 0:
        fail("no users")
    if n_ent == 0:
        fail("no entities")
    if n_int == 0:
        fail("no interactions")
    if schema.num_domains > MAX_DOMAINS:
        fail(f"{schema.num_domains} domains; at most {MAX_DOMAINS} are supported")
    for key, (rel, kind) in _FILES.items():
        arr = a[key]
        if kind == "U":
            if arr.dtype.kind != "U":
                fail(f"{rel}: expected a string array, got dtype {arr.dtype}")
        elif arr.dtype != np.dtype(kind):
            fail(f"{rel}: expected dtype {kind}, got {arr.dtype}")
    for group, n, cat_cols, num_cols in (
        ("users", n_users, schema.user_categorical, schema.user_numeric),
        ("entities", n_ent, schema.entity_categorical, schema.entity_numeric),
    ):
        cat, num = a[f"{group}.cat"], a[f"{group}.num"]
        width = sum(c.values for c in cat_cols)  # a multi-value column spans `values` columns
        if cat.shape != (n, width):
            fail(f"{group}/cat.npy: shape {cat.shape}, schema declares ({n}, {width})")
        if num.shape != (n, len(num_cols)):
            fail(f"{group}/num.npy: shape {num.shape}, schema declares ({n}, {len(num_cols)})")
        for col, sl in zip(cat_cols, cat_slices(cat_cols), strict=True):
            part = cat[:, sl]
            if n and (part.min() < 0 or part.max() >= col.cardinality):
                fail(
                    f"{group}/cat.npy column {col.name!r}: codes must be in [0, {col.cardinality}), "
                    f"found [{part.min()}, {part.max()}]"
                )
        if num.size and not np.isfinite(num).all():
            bad = int(np.argwhere(~np.isfinite(num))[0][1])
            fail(f"{group}/num.npy column {num_cols[bad].name!r}: NaN or infinite values")
        ids = a[f"{group}.external_id"]
        if ids.shape != (n,):
            fail(f"{group}/external_id.npy: shape {ids.shape}, expected ({n},)")
        if len(np.unique(ids)) != n:
            fail(f"{group}/external_id.npy: ids are not unique")
    et = a["entities.entity_type"]
    if et.shape != (n_ent,) or et.min() < 0 or et.max() >= schema.num_entity_types:
        fail(f"entities/entity_type.npy: values must be in [0, {schema.num_entity_types}) with shape ({n_ent},)")
    dm = a["entities.domain_mask"]
    if dm.shape != (n_ent,):
        fail(f"entities/domain_mask.npy: shape {dm.shape}, expected ({n_ent},)")
    if schema.num_domains < MAX_DOMAINS and np.any(dm >> np.uint64(schema.num_domains)):
        fail(f"entities/domain_mask.npy: bits set beyond the {schema.num_domains} declared domains")
    for key in ("interactions.entity", "interactions.domain", "interactions.timestamp", "interactions.split"):
        if a[key].shape != (n_int,):
            fail(f"{_FILES[key][0]}: shape {a[key].shape}, expected ({n_int},)")
    iu, ie, idm = a["interactions.user"], a["interactions.entity"], a["interactions.domain"]
    if iu.min() < 0 or iu.max() >= n_users:
        fail(f"interactions/user.npy: user rows must be in [0, {n_users}), found [{iu.min()}, {iu.max()}]")
    if ie.min() < 0 or ie.max() >= n_ent:
        fail(f"interactions/entity.npy: entity rows must be in [0, {n_ent}), found [{ie.min()}, {ie.max()}]")
    if idm.min() < 0 or idm.max() >= schema.num_domains:
        fail(f"interactions/domain.npy: domains must be in [0, {schema.num_domains}), found [{idm.min()}, {idm.max()}]")
    sp = a["interactions.split"]
    if sp.min() < TRAIN or sp.max() > TEST:
        fail("interactions/split.npy: values must be 0 (train), 1 (validation) or 2 (test)")
    if not np.all(iu[1:] >= iu[:-1]):
        fail("interactions are not sorted by user")


def load_dataset(root: Path, *, mmap: bool = True, verify_checksums: bool = False) -> Dataset:
    """Open a dataset directory (memory-mapped by default) and validate it against its schema."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a dataset directory (run `unimatch data synth` or `data import`)")
    manifest_path = root / "dataset.json"
    if not manifest_path.is_file():
        raise DatasetError(f"{root}: dataset.json missing; the directory is not a complete dataset")
    import json

    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{manifest_path}: invalid JSON ({exc})") from None
    if manifest.get("format_version") != DATASET_FORMAT_VERSION:
        raise DatasetError(f"{manifest_path}: format_version {manifest.get('format_version')} unsupported")
    try:
        schema = FeatureSchema.load(root / "schema.json")
    except SchemaError as exc:
        raise DatasetError(str(exc)) from None
    if manifest.get("schema_fingerprint") != schema.fingerprint():
        raise DatasetError(f"{root}: schema.json does not match the schema the data was written with")
    arrays: dict[str, np.ndarray] = {}
    for key, (rel, _) in _FILES.items():
        path = root / rel
        if not path.is_file():
            raise DatasetError(f"{path}: missing")
        if verify_checksums:
            expected = manifest.get("files", {}).get(rel, {}).get("sha256")
            if expected != sha256_file(path):
                raise DatasetError(f"{path}: checksum mismatch (file changed or corrupted)")
        try:
            arrays[key] = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except ValueError as exc:
            raise DatasetError(f"{path}: cannot load ({exc})") from None
    validate_arrays(schema, arrays, where=str(root))
    return Dataset(
        root=root,
        schema=schema,
        users=Users(arrays["users.external_id"], arrays["users.cat"], arrays["users.num"]),
        entities=Entities(
            arrays["entities.external_id"],
            arrays["entities.entity_type"],
            arrays["entities.cat"],
            arrays["entities.num"],
            arrays["entities.domain_mask"],
        ),
        interactions=Interactions(
            arrays["interactions.user"],
            arrays["interactions.entity"],
            arrays["interactions.domain"],
            arrays["interactions.timestamp"],
            arrays["interactions.split"],
        ),
        meta=manifest,
    )


def history_windows(
    entity: np.ndarray, user_start: np.ndarray, positions: np.ndarray, max_len: int
) -> np.ndarray:
    """Behaviour sequences strictly before each interaction position, most recent last.

    Args:
        entity: (I,) entity rows of interactions sorted by (user, time).
        user_start: (P,) first interaction row of the user owning each position.
        positions: (P,) interaction rows; the sequence ends just before each.
        max_len: L, the sequence length; shorter histories are left-padded with PAD (-1).

    Returns:
        (P, L) int32 entity rows, PAD where there is no history. Vectorised, no Python loop over P.
    """
    offs = np.arange(-max_len, 0, dtype=np.int64)  # (L,)
    idx = positions[:, None].astype(np.int64) + offs[None, :]  # (P, L)
    valid = idx >= user_start[:, None]
    seq = np.where(valid, entity[np.clip(idx, 0, None)], PAD)
    return seq.astype(np.int32)


def serving_sequences(ds: Dataset, *, include_test: bool = False) -> np.ndarray:
    """(U, L) the latest ``max_seq_len`` non-test interactions of each user: the online feature.

    This is what the feature store holds: everything the user did before the held-out test period.
    """
    inter = ds.interactions
    keep = np.ones(len(inter), dtype=bool) if include_test else np.asarray(inter.split) != TEST
    user = np.asarray(inter.user)[keep]
    entity = np.asarray(inter.entity)[keep]
    n_users = len(ds.users)
    counts = np.bincount(user, minlength=n_users)
    starts = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    ends = starts[1:]  # one past each user's last kept interaction
    return history_windows(entity, starts[:-1], ends, ds.schema.max_seq_len)
