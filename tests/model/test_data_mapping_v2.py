"""The mapping's newer keys: positive filter, header-less files, format, na_values, time types, eligibility."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contracts.dataset import DatasetError, load_dataset
from model.data.filters import FilterError, evaluate_filter, parse_filter
from model.data.mapping import import_mapping
from model.data.tables import time_feature
from unimatch.cli import main

# user, ad, clk, day, hour-stamp: an impression log as an ad server writes it (no header, no extension)
IMPRESSIONS = """u1|a1|1|20260105|2026-01-05T08:10:00
u1|a2|0|20260105|2026-01-05T08:11:00
u1|a3|1|20260106|2026-01-06T21:00:00
u2|a1|0|20260105|2026-01-05T09:00:00
u2|a2|1|20260107|2026-01-07T10:00:00
u2|a3|1|20260108|2026-01-08T23:59:00
u3|a1|0|20260101|2026-01-01T00:00:00
"""
COLUMNS = ["user", "ad", "clk", "day", "time"]


def write(tmp_path: Path, mapping: dict[str, Any], files: dict[str, str | bytes]) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for name, text in files.items():
        (src / name).write_bytes(text.encode() if isinstance(text, str) else text)
    (src / "mapping.json").write_text(json.dumps(mapping))
    return src / "mapping.json"


def impressions_mapping(**inter: Any) -> dict[str, Any]:
    base = {
        "file": "impressions",
        "format": "csv",
        "delimiter": "|",
        "columns": COLUMNS,
        "user": "user",
        "entity": "ad",
        "timestamp": "time",
        "positive": "clk == 1",
    }
    base.update(inter)
    return {"interactions": base, "split": {"n_test": 1, "n_valid": 0}}


# ---- the filter language ------------------------------------------------------------------------


def _eval(text: str, cols: dict[str, list[Any]]) -> list[bool]:
    node = parse_filter(text)
    return evaluate_filter(
        node, lambda c: np.asarray(cols[c], dtype=np.float64), lambda c: np.asarray(cols[c], dtype=str)
    ).tolist()


def test_filter_comparisons_precedence_and_in() -> None:
    cols = {"clk": [1, 0, 1, 0], "rating": [5, 4, 2, 3], "action": ["buy", "view", "click", "buy"], "a b": [1, 1, 0, 0]}
    assert _eval("clk == 1", cols) == [True, False, True, False]
    assert _eval("rating >= 4", cols) == [True, True, False, False]
    assert _eval("rating > 4 or rating < 3", cols) == [True, False, True, False]
    # and binds tighter than or; not tighter than and
    assert _eval("clk == 1 or rating == 4 and action == 'view'", cols) == [True, True, True, False]
    assert _eval("(clk == 1 or rating == 4) and not action == \"view\"", cols) == [True, False, True, False]
    assert _eval("action in ('buy', 'click')", cols) == [True, False, True, True]
    assert _eval("rating in (2, 3)", cols) == [False, False, True, True]
    assert _eval("`a b` != 1 AND rating <= 3", cols) == [False, False, True, True]
    assert _eval("rating > -1.5e0", cols) == [True] * 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("clk = 1", r"'=' at character 5: write '==' to compare"),
        ("clk ==", r"expected a number or a quoted string at character 7, got the end"),
        ("clk == 1 and", r"expected a column name at character 13, got the end"),
        ("(clk == 1", r"expected '\)' at character 10"),
        ("clk 1", r"expected a comparison .* after 'clk' at character 5, got '1'"),
        ("action > 'a'", r"> needs a number; strings support only ==, != and in"),
        ("x in (1, 'a')", r"mixes numbers and strings"),
        ("clk == 1 ; drop", r"unexpected ';' at character 10"),
        ("__import__('os')", r"expected a comparison"),
        ("  ", r"empty filter"),
    ],
)
def test_filter_parse_errors_say_where(text: str, message: str) -> None:
    with pytest.raises(FilterError, match=message):
        parse_filter(text)


# ---- an impression log: header-less, no extension, a click column, date columns ---------------


def test_impression_log_positive_filter_headerless_no_extension_and_dates(tmp_path: Path) -> None:
    m = impressions_mapping()
    m["users"] = {
        "file": "users.tsv",
        "id": "uid",
        "numeric": [{"column": "joined", "type": "days_since_epoch", "time_format": "%Y%m%d"}],
        "categorical": [{"column": "joined", "name": "join_weekday", "type": "day_of_week", "time_format": "%Y%m%d"}],
    }
    users = "uid\tjoined\nu1\t20260105\nu2\t19700102\nu3\t\n"
    ds = load_dataset(import_mapping(write(tmp_path, m, {"impressions": IMPRESSIONS, "users.tsv": users}), tmp_path / "o"))
    it = ds.interactions
    assert len(it) == 4  # the four clicks; u3 never clicked but is in the users table
    assert [ds.entities.external_id[e] for e in it.entity] == ["a1", "a3", "a2", "a3"]
    assert ds.meta["positive"] == {"filter": "clk == 1", "rows_read": 7, "rows_kept": 4}
    assert list(it.timestamp[:2]) == [1767600600, 1767733200]  # 2026-01-05T08:10Z, 2026-01-06T21:00Z
    enc = ds.meta["encodings"]
    assert enc["users.joined"]["type"] == "days_since_epoch"
    assert enc["users.joined"]["mean"] == pytest.approx((20458 + 1) / 2)  # 2026-01-05 is day 20458
    # 2026-01-05 was a Monday (0), 1970-01-02 a Friday (4); u3's empty cell is missing (code 0)
    assert enc["users.join_weekday"]["vocabulary"] == ["0", "4"]
    j = [c.name for c in ds.schema.user_categorical].index("join_weekday")
    assert ds.users.cat[:, j].tolist() == [1, 2, 0]


def test_rows_named_in_errors_are_file_rows_after_the_filter(tmp_path: Path) -> None:
    bad = IMPRESSIONS.replace("u2|a3|1|20260108|2026-01-08T23:59:00", "u2|a3|1|20260108|late")
    with pytest.raises(DatasetError, match=r"impressions: row 6 \(line 6\): column 'time': expected a number or an ISO"):
        import_mapping(write(tmp_path, impressions_mapping(), {"impressions": bad}), tmp_path / "o")


def test_rating_threshold_and_combination(tmp_path: Path) -> None:
    ratings = "user,item,rating,source\nu1,i1,5,web\nu1,i2,3,web\nu1,i3,4,app\nu2,i1,4,web\nu2,i2,1,app\n"
    m = {"interactions": {"file": "r.csv", "user": "user", "entity": "item", "positive": "rating >= 4"}}
    ds = load_dataset(import_mapping(write(tmp_path, m, {"r.csv": ratings}), tmp_path / "a"))
    assert len(ds.interactions) == 3
    m["interactions"]["positive"] = "rating >= 4 and source == 'web'"
    ds = load_dataset(import_mapping(write(tmp_path, m, {"r.csv": ratings}), tmp_path / "b"))
    assert len(ds.interactions) == 2


def test_time_feature_kinds() -> None:
    t = np.array([0.0, 86400 * 3 + 3600 * 5 + 1, np.nan, 1767600600.0])  # 1970-01-01, 1970-01-04T05:00:01, -, 2026-01-05T08:10
    assert time_feature(t, "days_since_epoch")[[0, 1, 3]].tolist() == [0, 3, 20458]
    assert time_feature(t, "hour_of_day")[[0, 1, 3]].tolist() == [0, 5, 8]
    assert time_feature(t, "day_of_week")[[0, 1, 3]].tolist() == [3, 6, 0]  # Thu, Sun, Mon
    assert time_feature(t, "month")[[0, 3]].tolist() == [1, 1] and time_feature(t, "year")[[0, 3]].tolist() == [1970, 2026]
    assert np.isnan(time_feature(t, "epoch_seconds")[2])


# ---- na_values ----------------------------------------------------------------------------------


def test_na_values_default_to_empty_cells_only(tmp_path: Path) -> None:
    events = "user,item,score\nNA,i1,1.5\nu2,i1,\nu2,i2,2\n"
    m: dict[str, Any] = {
        "interactions": {"file": "e.csv", "user": "user", "entity": "item"},
        "users": {"file": "e.csv", "id": "user", "unique": False},
        "entities": {"file": "e.csv", "id": "item", "unique": False, "numeric": ["score"]},
    }
    ds = load_dataset(import_mapping(write(tmp_path, m, {"e.csv": events}), tmp_path / "a"))
    assert sorted(ds.users.external_id.tolist()) == ["NA", "u2"]  # "NA" is an id, not a null
    # declared: "NA" and "-" are missing; a missing user id is then an error naming the row
    m["na_values"] = ["NA", "-", ""]
    with pytest.raises(DatasetError, match=r"e.csv: row 1 \(line 2\): column 'user' is empty"):
        import_mapping(write(tmp_path, m, {"e.csv": events}), tmp_path / "b")
    # a table's own na_values win over the mapping's
    m["entities"]["na_values"] = ["-", ""]
    m["na_values"] = None
    ds = load_dataset(import_mapping(write(tmp_path, m, {"e.csv": events.replace(",2\n", ",-\n")}), tmp_path / "c"))
    assert ds.meta["encodings"]["entities.score"]["mean"] == pytest.approx(1.5)


def test_null_markers_are_numbers_errors_without_na_values(tmp_path: Path) -> None:
    events = "user,item,score\nu1,i1,1.5\nu2,i2,null\n"
    m = {
        "interactions": {"file": "e.csv", "user": "user", "entity": "item"},
        "entities": {"file": "e.csv", "id": "item", "numeric": ["score"]},
    }
    with pytest.raises(DatasetError, match=r"e.csv: row 2 \(line 3\): column 'score': expected a number, got 'null'"):
        import_mapping(write(tmp_path, m, {"e.csv": events}), tmp_path / "o")


# ---- format independent of the extension -------------------------------------------------------


def test_jsonl_and_extensionless_parquet(tmp_path: Path) -> None:
    lines = [{"u": "u1", "e": 7, "t": 1}, {"u": "u1", "e": 8, "t": 2}, {"u": "u2", "e": 7, "t": 3}]
    jsonl = "".join(json.dumps(x) + "\n" for x in lines)
    m = {"interactions": {"file": "events.log", "format": "jsonl", "user": "u", "entity": "e", "timestamp": "t"}}
    ds = load_dataset(import_mapping(write(tmp_path, m, {"events.log": jsonl}), tmp_path / "a"))
    assert ds.entities.external_id.tolist() == ["7", "8"] and len(ds.interactions) == 3
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"u": ["u1", "u2"], "e": ["a", "b"]}), buf)
    m = {"interactions": {"file": "dump", "format": "parquet", "user": "u", "entity": "e"}}
    ds = load_dataset(import_mapping(write(tmp_path, m, {"dump": buf.getvalue().to_pybytes()}), tmp_path / "b"))
    assert len(ds.interactions) == 2


# ---- eligibility per domain by entity type -----------------------------------------------------


RATINGS3 = "user,item,kind,domain\nu1,b1,book,books\nu1,m1,movie,movies\nu2,b2,book,books\nu2,m1,movie,movies\n"
ENTITIES3 = "item,kind\nb1,book\nb2,book\nm1,movie\nm2,movie\nm3,movie\nc1,cd\n"


def _three_domain(eligibility: Any) -> dict[str, Any]:
    return {
        "domains": ["books", "movies", "music"],
        "interactions": {"file": "r.csv", "user": "user", "entity": "item", "domain": "domain"},
        "entities": {"file": "e.csv", "id": "item", "entity_type": "kind"},
        "eligibility": eligibility,
    }


def test_eligibility_per_domain_by_entity_type(tmp_path: Path) -> None:
    m = _three_domain({"books": ["book"], "movies": ["movie"], "music": "all"})
    ds = load_dataset(import_mapping(write(tmp_path, m, {"r.csv": RATINGS3, "e.csv": ENTITIES3}), tmp_path / "a"))
    ids = ds.entities.external_id.tolist()
    mask = dict(zip(ids, ds.entities.domain_mask.tolist(), strict=True))
    assert mask == {"b1": 0b101, "b2": 0b101, "m1": 0b110, "m2": 0b110, "m3": 0b110, "c1": 0b100}
    # "observed" per domain is strict: m2/m3 (no interactions) are not eligible in movies
    m = _three_domain({"movies": "observed"})
    ds = load_dataset(import_mapping(write(tmp_path, m, {"r.csv": RATINGS3, "e.csv": ENTITIES3}), tmp_path / "b"))
    mask = dict(zip(ds.entities.external_id.tolist(), ds.entities.domain_mask.tolist(), strict=True))
    assert mask["m1"] == 0b111 and mask["m2"] == 0b101 and mask["b1"] == 0b101


# ---- every bad input: one line naming file, row and column; nothing written ------------------


@pytest.mark.parametrize(
    ("mapping", "files", "expected"),
    [
        (impressions_mapping(positive="clk == 2"), {"impressions": IMPRESSIONS}, r"impressions: no row passes the positive filter 'clk == 2' \(7 rows read\)"),
        (impressions_mapping(positive="clicked == 1"), {"impressions": IMPRESSIONS}, r"missing column 'clicked' \(named in the positive filter\)"),
        (impressions_mapping(), {"impressions": IMPRESSIONS.replace("u2|a1|0|", "u2|a1|no|")}, r"impressions: row 4 \(line 4\): column 'clk': expected a number, got 'no'"),
        (impressions_mapping(), {"impressions": IMPRESSIONS.replace("u2|a1|0|", "u2|a1||")}, r"impressions: row 4 \(line 4\): column 'clk' is empty; the positive filter needs a value"),
        (impressions_mapping(positive="clk = 1"), {"impressions": IMPRESSIONS}, r"mapping.json: field interactions.positive: .*cannot parse 'clk = 1': '=' at character 5"),
        (impressions_mapping(format=None), {"impressions": IMPRESSIONS}, r"impressions: no file extension; .* or set \"format\""),
        (impressions_mapping(format="xlsx"), {"impressions": IMPRESSIONS}, r"field interactions.format: Input should be 'csv', 'tsv', 'parquet' or 'jsonl'"),
        (impressions_mapping(columns=None), {"impressions": IMPRESSIONS}, r"missing column 'user' .*a header-less file needs \"columns\""),
        (impressions_mapping(columns=["user", "ad", "clk", "day"]), {"impressions": IMPRESSIONS}, r"impressions: line 1: cannot read as csv \(CSV parse error: Expected 4 columns, got 5"),
        (impressions_mapping(columns=["user", "ad", "ad", "day", "time"]), {"impressions": IMPRESSIONS}, r"field interactions.columns: .*duplicate column names \['ad'\]"),
        (impressions_mapping(format="parquet"), {"impressions": IMPRESSIONS}, r"\"columns\" applies to csv/tsv files only"),
        (impressions_mapping(format="jsonl", columns=None, delimiter=None), {"impressions": IMPRESSIONS}, r"impressions: cannot read as jsonl"),
        (impressions_mapping(timestamp="day", timestamp_format="%Y-%m-%d"), {"impressions": IMPRESSIONS}, r"impressions: row 1 \(line 1\): column 'day': '20260105' does not match time_format '%Y-%m-%d'"),
        (
            {**impressions_mapping(), "entities": {"file": "impressions", "format": "csv", "delimiter": "|", "columns": COLUMNS,
                                                   "id": "ad", "unique": False, "numeric": ["time"]}},
            {"impressions": IMPRESSIONS},
            r"impressions: column 'time': expected numbers, got dates \(timestamp\[s\]\); for a date/time column declare its \"type\"",
        ),
        (
            {**impressions_mapping(), "entities": {"file": "impressions", "format": "csv", "delimiter": "|", "columns": COLUMNS,
                                                   "id": "ad", "unique": False, "numeric": [{"column": "day", "time_format": "%Y%m%d"}]}},
            {"impressions": IMPRESSIONS},
            r"field entities.numeric: Value error, column 'day': \"time_format\" needs a \"type\"",
        ),
        (
            {**impressions_mapping(), "entities": {"file": "impressions", "format": "csv", "delimiter": "|", "columns": COLUMNS,
                                                   "id": "ad", "unique": False, "numeric": [{"column": "day", "type": "weekday"}]}},
            {"impressions": IMPRESSIONS},
            r"field entities.numeric.type: Input should be 'epoch_seconds', 'days_since_epoch'",
        ),
        (_three_domain({"comics": ["book"]}), {"r.csv": RATINGS3, "e.csv": ENTITIES3}, r"mapping.json: eligibility names unknown domains \['comics'\]"),
        (_three_domain({"books": ["paper"]}), {"r.csv": RATINGS3, "e.csv": ENTITIES3}, r"eligibility.books: unknown entity types \['paper'\]; the data has \['book', 'cd', 'movie'\]"),
        (_three_domain({"books": []}), {"r.csv": RATINGS3, "e.csv": ENTITIES3}, r"eligibility.books: no entity is eligible in domain 'books'"),
        (_three_domain("some"), {"r.csv": RATINGS3, "e.csv": ENTITIES3}, r"field eligibility"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_naming_file_row_and_column(
    tmp_path: Path, mapping: dict[str, Any], files: dict[str, str], expected: str
) -> None:
    path = write(tmp_path, mapping, files)
    with pytest.raises(DatasetError, match=expected) as info:
        import_mapping(path, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_exit_2_one_line_nothing_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = IMPRESSIONS.replace("u2|a1|0|", "u2|a1|x|")
    path = write(tmp_path, impressions_mapping(), {"impressions": bad})
    out = tmp_path / "ds"
    assert main(["data", "import", "--mapping", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "row 4 (line 4): column 'clk': expected a number, got 'x'" in err
    assert not out.exists()


def test_impressions_example_imports_trains_exports_and_serves(tmp_path: Path) -> None:
    """The worked example in examples/impressions: generated log -> dataset -> 3 steps -> bundle -> match."""
    import shutil
    import sys

    from contracts.bundle import load_bundle
    from contracts.features import UserFeatures
    from service.engine import MatchEngine

    example = Path(__file__).resolve().parents[2] / "examples" / "impressions"
    sys.path.insert(0, str(example))
    try:
        import make_example  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(example))
    src = make_example.main(tmp_path / "src")
    shutil.copy(example / "mapping.json", src / "mapping.json")
    data = import_mapping(src / "mapping.json", tmp_path / "data")
    ds = load_dataset(data)
    assert ds.meta["positive"]["rows_read"] == 8000 and len(ds.interactions) == ds.meta["positive"]["rows_kept"]
    is_video = np.asarray(ds.entities.entity_type) == ds.schema.entity_types.index("video")
    assert (ds.entities.domain_mask[is_video] == 0b01).all() and (ds.entities.domain_mask[~is_video] == 0b11).all()
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    assert main(["train", "--data", str(data), "--method", "dnn", "--out", str(run), "--max-steps", "3",
                 "--batch-size", "32", "--negatives", "8", "--embed-dim", "8", "--threads", "1", "--no-progress"]) == 0
    assert main(["export", "--run", str(run), "--out", str(bundle)]) == 0
    b = load_bundle(bundle)
    engine = MatchEngine(b, providers=["CPUExecutionProvider"])
    out = engine.match(UserFeatures.cold_start(b.schema), b.schema.domains.index("search"), 10)
    assert out.rows.size == 10 and not is_video[out.rows].any()  # search shows banners only


# ---- multi-value categorical columns (a tag list) ----------------------------------------------

TAG_ADS = "ad,kind,tags\na1,image,sport|shoes\na2,video,food\na3,video,\na4,image,shoes | sport|shoes|kids\n"
TAG_EVENTS = "user,ad,ts\n" + "".join(f"u{u},a{1 + (u + i) % 4},{i}\n" for u in range(6) for i in range(4))


def _tag_mapping(**feature: Any) -> dict[str, Any]:
    return {
        "interactions": {"file": "e.csv", "user": "user", "entity": "ad", "timestamp": "ts"},
        "entities": {"file": "ads.csv", "id": "ad", "entity_type": "kind",
                     "categorical": [{"column": "tags", "separator": "|", **feature}]},
    }  # fmt: skip


def test_multi_value_column_is_a_bag_of_codes(tmp_path: Path) -> None:
    ds = load_dataset(import_mapping(write(tmp_path, _tag_mapping(), {"e.csv": TAG_EVENTS, "ads.csv": TAG_ADS}), tmp_path / "a"))
    (col,) = ds.schema.entity_categorical
    assert col.values == 3 and col.cardinality == 5  # food, kids, shoes, sport + the reserved 0
    assert ds.meta["encodings"]["entities.tags"]["vocabulary"] == ["food", "kids", "shoes", "sport"]
    # left-aligned, 0-padded, file order of the tags, a repeated tag counted once, spaces stripped
    assert ds.entities.cat.tolist() == [[4, 3, 0], [1, 0, 0], [0, 0, 0], [3, 4, 2]]
    # max_values keeps the first ones
    m = _tag_mapping(max_values=1)
    ds = load_dataset(import_mapping(write(tmp_path, m, {"e.csv": TAG_EVENTS, "ads.csv": TAG_ADS}), tmp_path / "b"))
    assert ds.entities.cat.tolist() == [[4], [1], [0], [3]] and ds.schema.entity_categorical[0].values == 1


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        (_tag_mapping(default="x"), r"a multi-value column \(\"separator\"\) takes no \"type\" or \"default\""),
        (_tag_mapping(max_values=99), r"field entities.categorical.max_values: Input should be less than or equal to 64"),
        ({**_tag_mapping(), "users": {"file": "e.csv", "id": "user", "unique": False,
                                      "categorical": [{"column": "ad", "separator": "|"}]}},
         r"users feature 'ad': multi-value columns \(separator\) are supported on entities only"),
        ({**_tag_mapping(), "entities": {"file": "ads.csv", "id": "ad", "numeric": [{"column": "tags", "separator": "|"}]}},
         r"numeric column 'tags': \"separator\" \(a multi-value column\) is for categorical ones"),
    ],
)  # fmt: skip
def test_multi_value_bad_mappings(tmp_path: Path, mapping: dict[str, Any], expected: str) -> None:
    with pytest.raises(DatasetError, match=expected):
        import_mapping(write(tmp_path, mapping, {"e.csv": TAG_EVENTS, "ads.csv": TAG_ADS}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_too_many_values_without_max_values(tmp_path: Path) -> None:
    ads = TAG_ADS.replace("a2,video,food", "a2,video," + "|".join(f"t{i}" for i in range(70)))
    with pytest.raises(DatasetError, match=r"ads.csv: row 2 \(line 3\): column 'tags': 70 values; at most 64"):
        import_mapping(write(tmp_path, _tag_mapping(), {"e.csv": TAG_EVENTS, "ads.csv": ads}), tmp_path / "out")


def test_multi_value_mean_pooling_and_export_parity(tmp_path: Path) -> None:
    """The model mean-pools a bag's embeddings (an empty bag gives zeros) and the export matches PyTorch."""
    import torch

    from model.embeddings import CategoricalEmbedding

    emb = CategoricalEmbedding([3, 5], dim=2, values=[1, 3])  # a single-value column, then a 3-slot bag
    codes = torch.tensor([[2, 4, 3, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    t = emb.table.weight.detach()
    out = emb(codes).detach()
    torch.testing.assert_close(out[0], torch.cat([t[2], (t[3 + 4] + t[3 + 3]) / 2]))
    torch.testing.assert_close(out[1], torch.cat([t[0], torch.zeros(2)]))  # single-value 0 = "unknown" row
    torch.testing.assert_close(out[2], torch.cat([t[1], (t[4] * 3) / 3]))
    # the whole path: import with tags, train 3 steps, export (the export checks ONNX against PyTorch)
    src = write(tmp_path, _tag_mapping(), {"e.csv": TAG_EVENTS, "ads.csv": TAG_ADS})
    data = import_mapping(src, tmp_path / "data")
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    assert main(["train", "--data", str(data), "--method", "backbone", "--out", str(run), "--max-steps", "3",
                 "--batch-size", "4", "--negatives", "2", "--embed-dim", "8", "--threads", "1", "--no-progress"]) == 0
    assert main(["export", "--run", str(run), "--out", str(bundle)]) == 0
    from model.checkpoint import load_run
    from model.export import entity_tensors

    loaded = load_run(run)
    stored = np.load(bundle / "entities" / "ent_uee.npy")
    np.testing.assert_allclose(stored, entity_tensors(loaded.model, 4)["ent_uee"], rtol=1e-5, atol=1e-6)
    # the tags matter: a3 (no tags) and a2 (food) differ only in their bags, and so do their vectors
    assert not np.allclose(stored[1], stored[2])
