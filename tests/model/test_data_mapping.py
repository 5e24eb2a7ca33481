"""Bring-your-own import: the mapping file, the encodings, and every bad-input message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contracts.dataset import TEST, TRAIN, VALID, DatasetError, load_dataset
from model.data.mapping import import_mapping, load_mapping
from unimatch.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "byo"

EVENTS = """user_id,ad_id,placement,ts
u1,a1,feed,2026-01-01T00:00:00Z
u1,a2,feed,2026-01-01T00:01:00Z
u1,a3,feed,2026-01-01T00:02:00Z
u1,a1,search,2026-01-01T00:03:00Z
u2,a2,feed,2026-01-01T00:00:30
u2,a4,search,1767225700
"""
USERS = """user_id,gender,tenure
u1,m,10
u2,,30
u3,f,20
"""
ADS = """ad_id,kind,category,price,duration
a1,image,shoes,1.0,
a2,video,food,3.0,30
a3,video,shoes,,60
a4,live,games,5.0,
a5,image,food,2.0,
"""


def base_mapping() -> dict[str, Any]:
    return {
        "domains": ["feed", "search"],
        "interactions": {
            "file": "events.csv",
            "user": "user_id",
            "entity": "ad_id",
            "domain": "placement",
            "timestamp": "ts",
        },
        "users": {"file": "users.csv", "id": "user_id", "categorical": ["gender"], "numeric": ["tenure"]},
        "entities": {
            "file": "ads.csv",
            "id": "ad_id",
            "entity_type": "kind",
            "categorical": ["category"],
            "numeric": ["price", {"column": "duration", "applies_to": ["video"], "default": 0}],
        },
    }


def write_case(tmp_path: Path, mapping: dict[str, Any] | None = None, **files: str) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    contents = {"events.csv": EVENTS, "users.csv": USERS, "ads.csv": ADS}
    contents.update({k.replace("_", "."): v for k, v in files.items()})
    for name, text in contents.items():
        (src / name).write_text(text)
    path = src / "mapping.json"
    path.write_text(json.dumps(mapping if mapping is not None else base_mapping()))
    return path


def col(ds, group: str, name: str) -> np.ndarray:  # noqa: ANN001
    s = ds.schema
    obj = ds.users if group == "user" else ds.entities
    cats = s.user_categorical if group == "user" else s.entity_categorical
    nums = s.user_numeric if group == "user" else s.entity_numeric
    for j, c in enumerate(cats):
        if c.name == name:
            return np.asarray(obj.cat[:, j])
    for j, c in enumerate(nums):
        if c.name == name:
            return np.asarray(obj.num[:, j])
    raise KeyError(name)


def test_import_encodes_features_types_and_split(tmp_path: Path) -> None:
    ds = load_dataset(import_mapping(write_case(tmp_path), tmp_path / "out"), verify_checksums=True)
    s, it = ds.schema, ds.interactions
    assert s.domains == ["feed", "search"]
    assert s.entity_types == ["image", "live", "video"]  # sorted, no declared list
    assert list(ds.users.external_id) == ["u1", "u2", "u3"]  # users table order, u3 kept without interactions
    assert list(ds.entities.external_id) == ["a1", "a2", "a3", "a4", "a5"]
    # categorical: sorted vocabulary coded 1..n, missing -> 0
    np.testing.assert_array_equal(col(ds, "user", "gender"), [2, 0, 1])  # f=1, m=2
    assert s.user_categorical[0].cardinality == 3
    np.testing.assert_array_equal(col(ds, "entity", "category"), [3, 1, 3, 2, 1])  # food, games, shoes
    # numeric: standardised over observed rows; missing price gets the mean (0 after scaling)
    price = col(ds, "entity", "price")
    observed = np.array([1.0, 3.0, 5.0, 2.0])
    np.testing.assert_allclose(price[[0, 1, 3, 4]], (observed - observed.mean()) / observed.std(), rtol=1e-5)
    assert price[2] == pytest.approx(0.0)
    # type-specific: only videos carry duration; others hold the declared default (raw 0, scaled)
    dur = col(ds, "entity", "duration")
    spec = next(c for c in s.entity_numeric if c.name == "duration")
    assert spec.applies_to == ["video"]
    np.testing.assert_allclose(dur[[1, 2]], [-1.0, 1.0], rtol=1e-5)  # 30 and 60 standardised
    assert dur[0] == dur[3] == dur[4] == pytest.approx(spec.default) == pytest.approx((0 - 45) / 15)
    types = [s.entity_types[t] for t in ds.entities.entity_type]
    assert types == ["image", "video", "video", "live", "image"]
    # timestamps: ISO with Z, naive ISO (UTC) and epoch seconds all become epoch seconds
    u2 = it.user == 1
    assert list(it.timestamp[u2]) == [1767225630, 1767225700]
    # split: u1/feed has 3 rows -> train, valid, test by time; u1/search has 1 -> train
    u1_feed = (it.user == 0) & (it.domain == 0)
    assert list(it.split[u1_feed]) == [TRAIN, VALID, TEST]
    assert list(it.split[(it.user == 0) & (it.domain == 1)]) == [TRAIN]
    assert np.all(ds.entities.domain_mask == 0b11)  # eligibility "all"
    enc = ds.meta["encodings"]
    assert enc["users.gender"]["vocabulary"] == ["f", "m"] and enc["entities.price"]["mean"] == pytest.approx(2.75)


def test_worked_example_imports(tmp_path: Path) -> None:
    ds = load_dataset(import_mapping(EXAMPLE / "mapping.json", tmp_path / "byo"))
    assert ds.schema.domains == ["feed", "search", "video_tab"]
    assert ds.schema.entity_types == ["image", "video", "live"]
    assert len(ds.users) == 30 and len(ds.entities) == 40 and len(ds.interactions) == 400


def test_parquet_observed_eligibility_shipped_split_and_flat_log(tmp_path: Path) -> None:
    """A single flat Parquet log: entity features repeated per row, a split column, native timestamps."""
    log = pa.table(
        {
            "uid": pa.array([1, 1, 2, 2], pa.int64()),
            "item": ["x", "y", "x", "z"],
            "dom": ["a", "b", "a", "a"],
            "when": pa.array([0, 5, 3, 9], pa.timestamp("s")),
            "part": ["train", "test", "train", "validation"],
            "brand": ["p", "q", "p", None],
        }
    )
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(log, src / "log.parquet")
    mapping = {
        "interactions": {
            "file": "log.parquet",
            "user": "uid",
            "entity": "item",
            "domain": "dom",
            "timestamp": "when",
            "split": "part",
        },
        "entities": {"file": "log.parquet", "id": "item", "categorical": ["brand"], "unique": False},
        "eligibility": "observed",
        "default_entity_type": "product",
    }
    (src / "m.json").write_text(json.dumps(mapping))
    ds = load_dataset(import_mapping(src / "m.json", tmp_path / "out"))
    assert ds.schema.entity_types == ["product"] and list(ds.users.external_id) == ["1", "2"]
    assert list(ds.entities.external_id) == ["x", "y", "z"]
    np.testing.assert_array_equal(ds.entities.domain_mask, [0b01, 0b10, 0b01])
    assert sorted(ds.interactions.split.tolist()) == [TRAIN, TRAIN, VALID, TEST]
    assert sorted(ds.interactions.timestamp.tolist()) == [0, 3, 5, 9]
    np.testing.assert_array_equal(col(ds, "entity", "brand"), [1, 2, 0])


def test_parquet_timestamp_units_and_timezones(tmp_path: Path) -> None:
    """Sub-second and zoned Parquet timestamps, and dates, all become UTC epoch seconds."""
    from datetime import UTC, date, datetime

    src = tmp_path / "src"
    src.mkdir()
    when = [datetime(2026, 1, 1, 0, 0, 0, 123000, tzinfo=UTC), datetime(2026, 1, 1, 0, 0, 5, tzinfo=UTC)]
    for name, arr in {
        "ms": pa.array(when, pa.timestamp("ms")),
        "zoned": pa.array(when, pa.timestamp("us", tz="Europe/Paris")),
        "day": pa.array([date(2026, 1, 1), date(2026, 1, 2)], pa.date32()),
    }.items():
        pq.write_table(pa.table({"u": ["a", "a"], "e": ["x", "y"], "t": arr}), src / f"{name}.parquet")
        (src / f"{name}.json").write_text(
            json.dumps({"interactions": {"file": f"{name}.parquet", "user": "u", "entity": "e", "timestamp": "t"}})
        )
        ts = load_dataset(import_mapping(src / f"{name}.json", tmp_path / name)).interactions.timestamp
        expected = [1767225600, 1767312000] if name == "day" else [1767225600, 1767225605]
        assert ts.tolist() == expected, name


def test_yaml_mapping(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    path = write_case(tmp_path)
    (path.parent / "mapping.yaml").write_text(yaml.safe_dump(base_mapping()))
    assert load_dataset(import_mapping(path.parent / "mapping.yaml", tmp_path / "out")).schema.num_domains == 2


def test_no_tables_single_domain_file_order(tmp_path: Path) -> None:
    m = {"interactions": {"file": "events.csv", "user": "user_id", "entity": "ad_id"}}
    ds = load_dataset(import_mapping(write_case(tmp_path, m), tmp_path / "out"))
    assert ds.schema.domains == ["all"] and ds.schema.entity_types == ["item"]
    assert ds.users.cat.shape == (2, 0) and "file order" in ds.meta["time"]


def _with(path_to: list[str], value: Any) -> dict[str, Any]:
    m = base_mapping()
    node = m
    for key in path_to[:-1]:
        node = node[key]
    node[path_to[-1]] = value
    return m


@pytest.mark.parametrize(
    ("mapping", "files", "expected"),
    [
        # missing columns
        (
            _with(["interactions", "timestamp"], "time"),
            {},
            r"events.csv: missing column 'time' \(named in the mapping's interactions\)",
        ),
        (_with(["users", "numeric"], ["age"]), {}, r"users.csv: missing column 'age'"),
        # unknown domain labels
        (
            _with(["domains"], ["feed"]),
            {},
            r"events.csv: row 4 \(line 5\): column 'placement': unknown domain 'search'",
        ),
        # ids out of range: an interaction's user / entity not in its table
        (
            None,
            {"users_csv": "user_id,gender,tenure\nu1,m,1\n"},
            r"events.csv: row 5 \(line 6\): column 'user_id': user 'u2' is not in",
        ),
        (
            None,
            {"ads_csv": ADS.replace("a4,live", "a9,live")},
            r"row 6 \(line 7\): column 'ad_id': entity 'a4' is not in",
        ),
        # empty files
        (None, {"events_csv": ""}, r"events.csv: empty file"),
        (None, {"users_csv": "user_id,gender,tenure\n"}, r"users.csv: no data rows"),
        # wrong types
        (
            None,
            {"users_csv": USERS.replace("u3,f,20", "u3,f,twenty")},
            r"users.csv: row 3 \(line 4\): column 'tenure': expected a number, got 'twenty'",
        ),
        (
            None,
            {"events_csv": EVENTS.replace("1767225700", "soon")},
            r"row 6 \(line 7\): column 'ts': expected a number or an ISO-8601 time, got 'soon'",
        ),
        (None, {"events_csv": EVENTS.replace("u2,a4", ",a4")}, r"row 6 \(line 7\): column 'user_id' is empty"),
        # a schema the data cannot satisfy
        (
            _with(["entity_types"], ["image", "video"]),
            {},
            r"ads.csv: row 4 \(line 5\): column 'kind': unknown entity type 'live'",
        ),
        (
            _with(["entities", "categorical"], [{"column": "category", "applies_to": ["banner"]}]),
            {},
            r"mapping.json: feature 'category' applies_to unknown entity types \['banner'\]",
        ),
        (
            _with(["users", "categorical"], [{"column": "gender", "applies_to": ["video"]}]),
            {},
            r"cannot have applies_to",
        ),
        (_with(["users", "categorical"], ["gender", "gender"]), {}, r"invalid schema: .*duplicate column names"),
        # duplicates, bad mapping fields, unsupported files
        (None, {"users_csv": USERS + "u1,f,3\n"}, r"users.csv: row 4 \(line 5\): column 'user_id': duplicate id 'u1'"),
        (
            _with(["interactions", "time_column"], "ts"),
            {},
            r"mapping.json: field interactions.time_column: Extra inputs are not permitted",
        ),
        (_with(["interactions", "file"], "events.xlsx"), {}, r"unsupported file type '.xlsx'"),
        (_with(["interactions", "file"], "nope.csv"), {}, r"nope.csv: file not found"),
        (
            None,
            {"events_csv": EVENTS + "u2,a1\n"},
            r"events.csv: line 8: cannot read as csv \(CSV parse error: Expected 4 columns, got 2",
        ),
    ],
)
def test_bad_input_names_file_row_and_column(
    tmp_path: Path, mapping: dict[str, Any] | None, files: dict[str, str], expected: str
) -> None:
    path = write_case(tmp_path, mapping, **files)
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=expected):
        import_mapping(path, out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left


def test_bad_split_and_conflicting_types(tmp_path: Path) -> None:
    events = "u,e,t,s\nu1,a,image,train\nu1,b,video,later\n"
    m = {"interactions": {"file": "events.csv", "user": "u", "entity": "e", "entity_type": "t", "split": "s"}}
    with pytest.raises(
        DatasetError, match=r"row 2 \(line 3\): column 's': expected train, validation or test, got 'later'"
    ):
        import_mapping(write_case(tmp_path, m, events_csv=events), tmp_path / "out")
    events = "u,e,t,s\nu1,a,image,train\nu1,a,video,test\n"
    with pytest.raises(DatasetError, match=r"entity 'a' has type .* on another row"):
        import_mapping(write_case(tmp_path, m, events_csv=events), tmp_path / "out")


def test_mapping_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="mapping file not found"):
        load_mapping(tmp_path / "none.json")
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"m.json: invalid JSON"):
        load_mapping(tmp_path / "m.json")
    (tmp_path / "m.json").write_text("[]")
    with pytest.raises(DatasetError, match="expected a mapping object"):
        load_mapping(tmp_path / "m.json")
    (tmp_path / "m.json").write_text(json.dumps({"interactions": {"file": "x.csv", "user": "u"}}))
    with pytest.raises(DatasetError, match=r"field interactions.entity: Field required"):
        load_mapping(tmp_path / "m.json")


def test_cli_mapping_import_and_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = tmp_path / "byo"
    shutil.copytree(EXAMPLE, example)
    assert main(["data", "import", "--mapping", str(example / "mapping.json"), "--out", str(tmp_path / "ds")]) == 0
    out, err = capsys.readouterr()
    assert "test queries" in out and "domain 'video_tab': 15 test queries (53.6% of its 28 users)" in err
    (example / "users.csv").write_text("user_id,gender,age_group,tenure_days\n")
    assert main(["data", "import", "--mapping", str(example / "mapping.json"), "--out", str(tmp_path / "ds2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "users.csv: no data rows" in err
    assert main(["data", "import", "movielens-100k", "--mapping", "x.json", "--out", str(tmp_path / "d")]) == 2
