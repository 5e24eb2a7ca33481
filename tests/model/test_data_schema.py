"""Schema validation and the on-disk dataset format: refused inputs, fingerprints, corruption, atomicity."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from contracts.dataset import (
    TEST,
    TRAIN,
    DatasetError,
    Entities,
    Interactions,
    Users,
    _as_arrays,
    load_dataset,
    validate_arrays,
    write_dataset,
)
from contracts.schema import CategoricalFeature, FeatureSchema, NumericFeature, SchemaError


def small_schema(**over: object) -> FeatureSchema:
    kw: dict[str, object] = {
        "domains": ["d0", "d1"],
        "entity_types": ["item", "live"],
        "user_categorical": [CategoricalFeature(name="gender", cardinality=3)],
        "user_numeric": [NumericFeature(name="activity")],
        "entity_categorical": [
            CategoricalFeature(name="category", cardinality=5),
            CategoricalFeature(name="anchor", cardinality=4, applies_to=["live"]),
        ],
        "entity_numeric": [NumericFeature(name="price")],
        "max_seq_len": 4,
    }
    kw.update(over)
    return FeatureSchema(**kw)  # type: ignore[arg-type]


def small_parts() -> tuple[Users, Entities, Interactions]:
    users = Users(np.array(["a", "b", "c"]), np.array([[1], [2], [0]], np.int32), np.zeros((3, 1), np.float32))
    ents = Entities(
        np.array(["e0", "e1", "e2", "e3"]),
        np.array([0, 0, 1, 1], np.int16),
        np.array([[1, 0], [2, 0], [3, 1], [4, 3]], np.int32),
        np.linspace(-1, 1, 4, dtype=np.float32)[:, None],
        np.array([1, 3, 2, 3], np.uint64),
    )
    inter = Interactions(
        user=np.array([0, 0, 0, 1, 1, 2], np.int32),
        entity=np.array([0, 1, 2, 3, 1, 0], np.int32),
        domain=np.array([0, 0, 0, 1, 1, 0], np.int16),
        timestamp=np.array([1, 2, 3, 1, 2, 5], np.int64),
        split=np.array([TRAIN, TRAIN, TEST, TRAIN, TEST, TRAIN], np.int8),
    )
    return users, ents, inter


def write_small(path: Path, schema: FeatureSchema | None = None) -> Path:
    users, ents, inter = small_parts()
    return write_dataset(path, schema=schema or small_schema(), users=users, entities=ents, interactions=inter)


# ---- FeatureSchema --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        (
            {"entity_categorical": [CategoricalFeature(name="x", cardinality=3, applies_to=["shop"])]},
            "unknown entity types",
        ),
        ({"user_numeric": [NumericFeature(name="x", applies_to=["item"])]}, "cannot have applies_to"),
        (
            {"user_categorical": [CategoricalFeature(name="g", cardinality=3)] * 2},
            "duplicate column names in user_categorical",
        ),
        ({"domains": ["d0", "d0"]}, "names must be unique"),
        ({"domains": []}, "at least 1"),
        ({"entity_types": ["x" * 65]}, "1..64 characters"),
        ({"format_version": 99}, "format_version 99"),
        ({"max_seq_len": 0}, "greater than or equal to 1"),
    ],
)
def test_schema_rejects(over: dict[str, object], expected: str) -> None:
    with pytest.raises(ValidationError, match=expected):
        small_schema(**over)


def test_feature_column_rules() -> None:
    with pytest.raises(ValidationError, match="default 3 of 'g' is not below cardinality 3"):
        CategoricalFeature(name="g", cardinality=3, default=3)
    with pytest.raises(ValidationError, match="greater than or equal to 2"):
        CategoricalFeature(name="g", cardinality=1)
    with pytest.raises(ValidationError, match="String should match pattern"):
        NumericFeature(name="bad name")
    with pytest.raises(ValidationError, match="Extra inputs"):
        CategoricalFeature.model_validate({"name": "g", "cardinality": 3, "vocab": []})


def test_schema_roundtrip_fingerprint_and_lookup(tmp_path: Path) -> None:
    s = small_schema()
    s.save(tmp_path / "schema.json")
    loaded = FeatureSchema.load(tmp_path / "schema.json")
    assert loaded == s and loaded.fingerprint() == s.fingerprint()
    assert small_schema(max_seq_len=5).fingerprint() != s.fingerprint()
    assert s.domain_index("d1") == 1 and s.entity_type_index("live") == 1
    with pytest.raises(SchemaError, match=r"unknown domain 'd9'; expected one of \['d0', 'd1'\]"):
        s.domain_index("d9")


def test_schema_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="schema file not found"):
        FeatureSchema.load(tmp_path / "none.json")
    bad = tmp_path / "schema.json"
    bad.write_text("{")
    with pytest.raises(SchemaError, match=f"{bad}: invalid schema"):
        FeatureSchema.load(bad)
    doc = small_schema().model_dump()
    doc["entity_categorical"][0]["default"] = 9
    bad.write_text(json.dumps(doc))
    with pytest.raises(SchemaError, match="not below cardinality"):
        FeatureSchema.load(bad)


# ---- dataset files --------------------------------------------------------------------------------


def test_write_and_load_roundtrip(tmp_path: Path) -> None:
    ds = load_dataset(write_small(tmp_path / "ds"), verify_checksums=True)
    assert ds.meta["counts"] == {"users": 3, "entities": 4, "interactions": 6}
    np.testing.assert_array_equal(ds.entities.in_domain(1), [False, True, True, True])
    assert ds.schema == small_schema()


def test_fingerprint_mismatch_is_refused(tmp_path: Path) -> None:
    root = write_small(tmp_path / "ds")
    small_schema(max_seq_len=9).save(root / "schema.json")  # valid schema, but not the one the data was written with
    with pytest.raises(DatasetError, match="schema.json does not match the schema the data was written with"):
        load_dataset(root)


def test_schema_not_matching_the_arrays_is_refused(tmp_path: Path) -> None:
    """A schema declaring another column count is caught even when the fingerprint is patched to match."""
    root = write_small(tmp_path / "ds")
    other = small_schema(user_numeric=[NumericFeature(name="activity"), NumericFeature(name="tenure")])
    other.save(root / "schema.json")
    manifest = json.loads((root / "dataset.json").read_text())
    manifest["schema_fingerprint"] = other.fingerprint()
    (root / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"users/num.npy: shape \(3, 1\), schema declares \(3, 2\)"):
        load_dataset(root)


def test_missing_and_corrupted_files(tmp_path: Path) -> None:
    root = write_small(tmp_path / "ds")
    (root / "interactions" / "domain.npy").unlink()
    with pytest.raises(DatasetError, match=r"interactions/domain.npy: missing"):
        load_dataset(root)

    root = write_small(tmp_path / "ds2")
    path = root / "entities" / "cat.npy"
    path.write_bytes(path.read_bytes()[:20])  # truncated header
    with pytest.raises(DatasetError, match=r"entities/cat.npy: cannot load"):
        load_dataset(root)

    root = write_small(tmp_path / "ds3")
    arr = np.load(root / "entities" / "num.npy")
    np.save(root / "entities" / "num.npy", arr + 1)  # same shape, different bytes
    with pytest.raises(DatasetError, match="checksum mismatch"):
        load_dataset(root, verify_checksums=True)

    root = write_small(tmp_path / "ds4")
    (root / "dataset.json").unlink()
    with pytest.raises(DatasetError, match="dataset.json missing"):
        load_dataset(root)
    with pytest.raises(DatasetError, match="not a dataset directory"):
        load_dataset(tmp_path / "nowhere")

    root = write_small(tmp_path / "ds5")
    (root / "dataset.json").write_text("{oops")
    with pytest.raises(DatasetError, match="dataset.json: invalid JSON"):
        load_dataset(root)


def _arrays(**changes: np.ndarray) -> dict[str, np.ndarray]:
    users, ents, inter = small_parts()
    a = _as_arrays(users, ents, inter)
    a.update(changes)
    return a


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"entities.cat": np.array([[1, 0], [2, 0], [5, 1], [4, 3]], np.int32)},
            r"column 'category': codes must be in \[0, 5\)",
        ),
        ({"users.cat": np.array([[1], [-1], [0]], np.int32)}, r"users/cat.npy column 'gender'"),
        ({"entities.num": np.array([[0], [np.nan], [0], [0]], np.float32)}, r"entities/num.npy column 'price': NaN"),
        ({"users.num": np.zeros((3, 1), np.float64)}, r"users/num.npy: expected dtype float32, got float64"),
        ({"users.cat": np.zeros((3, 2), np.int32)}, r"users/cat.npy: shape \(3, 2\), schema declares \(3, 1\)"),
        (
            {"interactions.entity": np.array([0, 1, 2, 3, 1, 4], np.int32)},
            r"interactions/entity.npy: entity rows must be in \[0, 4\)",
        ),
        (
            {"interactions.user": np.array([0, 0, 0, 1, 1, 3], np.int32)},
            r"interactions/user.npy: user rows must be in \[0, 3\)",
        ),
        (
            {"interactions.domain": np.array([0, 0, 0, 2, 1, 0], np.int16)},
            r"interactions/domain.npy: domains must be in \[0, 2\)",
        ),
        ({"interactions.split": np.array([0, 0, 3, 0, 0, 0], np.int8)}, r"interactions/split.npy: values must be 0"),
        ({"interactions.user": np.array([0, 1, 0, 1, 1, 2], np.int32)}, "not sorted by user"),
        (
            {"entities.entity_type": np.array([0, 0, 2, 1], np.int16)},
            r"entities/entity_type.npy: values must be in \[0, 2\)",
        ),
        (
            {"entities.domain_mask": np.array([1, 4, 2, 3], np.uint64)},
            r"entities/domain_mask.npy: bits set beyond the 2",
        ),
        ({"users.external_id": np.array(["a", "a", "c"])}, r"users/external_id.npy: ids are not unique"),
        ({"entities.external_id": np.array([1, 2, 3, 4])}, r"entities/external_id.npy: expected a string array"),
        (
            {"interactions.timestamp": np.zeros(5, np.int64)},
            r"interactions/timestamp.npy: shape \(5,\), expected \(6,\)",
        ),
    ],
)
def test_validate_arrays_names_the_column(changes: dict[str, np.ndarray], expected: str) -> None:
    with pytest.raises(DatasetError, match=expected):
        validate_arrays(small_schema(), _arrays(**changes), where="here")


def test_invalid_data_is_never_written(tmp_path: Path) -> None:
    users, ents, inter = small_parts()
    bad = replace(ents, cat=np.full((4, 2), 7, np.int32))
    out = tmp_path / "ds"
    with pytest.raises(DatasetError, match="codes must be in"):
        write_dataset(out, schema=small_schema(), users=users, entities=bad, interactions=inter)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_rewrite_replaces_atomically(tmp_path: Path) -> None:
    root = write_small(tmp_path / "ds")
    users, ents, inter = small_parts()
    write_dataset(root, schema=small_schema(max_seq_len=8), users=users, entities=ents, interactions=inter)
    assert load_dataset(root).schema.max_seq_len == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary or old folder left


def test_atomic_outputs_get_umask_modes_not_private_ones(tmp_path: Path) -> None:
    """Service replicas often run as another user: outputs must not stay 0700/0600 like temp files."""
    import os
    import stat

    from contracts.io import atomic_directory, atomic_write_text

    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as d:
            (d / "x").write_text("1")
        atomic_write_text(tmp_path / "f.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644


def test_fingerprint_is_computed_once_and_follows_copies() -> None:
    import hashlib

    from contracts.schema import FeatureSchema

    s = FeatureSchema(domains=["a", "b"], entity_types=["item"])
    assert s.fingerprint() == hashlib.sha256(s.model_dump_json().encode()).hexdigest()[:16]
    assert s == FeatureSchema.model_validate_json(s.model_dump_json())
    changed = s.model_copy(update={"max_seq_len": 7})
    assert changed.max_seq_len == 7 and changed.fingerprint() != s.fingerprint()
    assert changed.fingerprint() == hashlib.sha256(changed.model_dump_json().encode()).hexdigest()[:16]
