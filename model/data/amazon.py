"""Importer for the amazon-cdr cross-domain pairs (DisenCDR's Amazon reviews) into the UMES format.

The shared data folder ``amazon-cdr/`` holds two 2-domain datasets whose users are shared across
the two folders of a pair (``phone_electronic`` + ``electronic_phone``, ``sport_cloth`` +
``cloth_sport``). Each folder has ``train.txt`` and ``test.txt`` with tab-separated
``user_id  item_id  1`` rows: implicit feedback, no features, no timestamps.

How the unified entity space (paper section IV-A) is filled from that:

* one domain per folder, users shared by id; item ids are per-domain, so entities are namespaced
  (``phone:14419``) and each entity is eligible only in its own domain (``domain_mask``);
* a single entity type ``item``;
* the shipped split is kept: ``test.txt`` rows are TEST; the last ``train.txt`` row of each
  (user, domain) with at least two train rows becomes VALID. There are no timestamps, so *file
  order is used as time*, with all training rows (both domains) first, then validation, then test
  rows, so that no held-out interaction appears in the history of a training one; the manifest
  says so;
* features: the data has none, so entities get a domain-of-origin categorical and a
  log-popularity numeric counted on TRAIN rows only (validation and test never leak into it);
  users have no profile features, only their behaviour sequence.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contracts.dataset import TEST, TRAIN, VALID, DatasetError, Entities, Interactions, Users, write_dataset
from contracts.schema import CategoricalFeature, FeatureSchema, NumericFeature
from model.data.mapping import train_log_popularity
from model.data.split import leave_last_out

# The environment variable that, when set, is the default of ``--source-dir`` (read only in
# default_shared_data_dir): machines that keep the real data elsewhere set it once.
SHARED_DATA_ENV = "UNIMATCH_SHARED_DATA"


@dataclass(frozen=True)
class AmazonPair:
    """One 2-domain dataset: the folders in domain order and the domain name of each."""

    folders: tuple[str, str]
    domains: tuple[str, str]


PAIRS: dict[str, AmazonPair] = {
    "amazon-phone-electronic": AmazonPair(("phone_electronic", "electronic_phone"), ("phone", "electronic")),
    "amazon-sport-cloth": AmazonPair(("sport_cloth", "cloth_sport"), ("sport", "cloth")),
}


def default_shared_data_dir() -> Path:
    """The default of ``unimatch data import --source-dir`` for amazon-cdr.

    ``$UNIMATCH_SHARED_DATA`` when set, else a ``shared/data`` folder next to the repository checkout
    (where the team's machines keep the real catalogues).
    """
    env = os.environ.get(SHARED_DATA_ENV, "").strip()
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "data"


def _pair_root(source_dir: Path, pair: AmazonPair) -> Path:
    """Accept either the shared data directory (holding ``amazon-cdr/``) or ``amazon-cdr/`` itself."""
    for root in (source_dir / "amazon-cdr", source_dir):
        if all((root / f).is_dir() for f in pair.folders):
            return root
    raise FileNotFoundError(
        f"{source_dir}: no amazon-cdr folders {list(pair.folders)} found (looked in {source_dir / 'amazon-cdr'} "
        f"and {source_dir}); pass --source-dir or set {SHARED_DATA_ENV}"
    )


def read_pairs_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a ``user<TAB>item<TAB>1`` file; returns (user ids, item ids) as int64 in file order.

    Raises DatasetError naming the file and line for an empty file, a wrong field count, a
    non-integer or negative id, or a label other than 1 (the data is implicit feedback).
    """
    if not path.is_file():
        raise DatasetError(f"{path}: missing (expected tab-separated 'user item 1' rows)")
    users: list[int] = []
    items: list[int] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 3:
                raise DatasetError(
                    f"{path}: line {lineno}: expected 3 tab-separated fields (user, item, 1), got {len(fields)}"
                )
            try:
                u, i, label = int(fields[0]), int(fields[1]), int(fields[2])
            except ValueError:
                raise DatasetError(f"{path}: line {lineno}: expected integer ids, got {line!r}") from None
            if u < 0 or i < 0:
                raise DatasetError(f"{path}: line {lineno}: ids must be >= 0, got user {u}, item {i}")
            if label != 1:
                raise DatasetError(f"{path}: line {lineno}: third field must be 1 (implicit feedback), got {label}")
            users.append(u)
            items.append(i)
    if not users:
        raise DatasetError(f"{path}: empty file (expected tab-separated 'user item 1' rows)")
    return np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)


def import_amazon(source: str, out: Path, *, source_dir: Path | None = None, max_seq_len: int = 50) -> Path:
    """Import one amazon-cdr pair (``amazon-phone-electronic`` or ``amazon-sport-cloth``) to ``out``.

    Args:
        source: the pair's name, a key of ``PAIRS``.
        out: dataset directory to write (atomically).
        source_dir: the shared data directory (default: ``default_shared_data_dir()``).
        max_seq_len: behaviour sequence length written into the schema.
    """
    if source not in PAIRS:
        raise ValueError(f"unknown amazon-cdr source {source!r}; expected one of {sorted(PAIRS)}")
    pair = PAIRS[source]
    root = _pair_root(Path(source_dir) if source_dir is not None else default_shared_data_dir(), pair)

    user_parts, ent_parts, dom_parts, test_parts, ent_ids, ent_domain = [], [], [], [], [], []
    ent_offset = 0
    for k, (folder, dom) in enumerate(zip(pair.folders, pair.domains, strict=True)):
        tr_u, tr_i = read_pairs_file(root / folder / "train.txt")
        te_u, te_i = read_pairs_file(root / folder / "test.txt")
        items = np.unique(np.concatenate([tr_i, te_i]))  # entities: every item seen in this domain
        rows = np.searchsorted(items, np.concatenate([tr_i, te_i])) + ent_offset
        user_parts.append(np.concatenate([tr_u, te_u]))
        ent_parts.append(rows)
        dom_parts.append(np.full(rows.shape[0], k, dtype=np.int16))
        test_parts.append(np.r_[np.zeros(tr_u.shape[0], dtype=bool), np.ones(te_u.shape[0], dtype=bool)])
        ent_ids.append(np.char.add(f"{dom}:", items.astype(str)))
        ent_domain.append(np.full(items.shape[0], k, dtype=np.int64))
        ent_offset += items.shape[0]

    raw_user = np.concatenate(user_parts)
    user_ids, user_row = np.unique(raw_user, return_inverse=True)  # users shared across the pair by id
    entity = np.concatenate(ent_parts)
    domain = np.concatenate(dom_parts)
    is_test = np.concatenate(test_parts)
    # No timestamps in the data: file order is time, and every train row precedes every test row.
    timestamp = np.arange(entity.shape[0], dtype=np.int64)

    split = np.full(entity.shape[0], TRAIN, dtype=np.int8)
    split[is_test] = TEST
    train_rows = np.flatnonzero(~is_test)
    # the last train row of each (user, domain), when at least one train row stays, is validation
    last = leave_last_out(
        user_row[train_rows], domain[train_rows], timestamp[train_rows], num_domains=2, n_test=1, n_valid=0, min_train=1
    )
    split[train_rows[last == TEST]] = VALID
    # Made-up time, so make it leak-free across domains too: every train row of a user (either
    # domain) precedes every validation row, which precedes every test row; file order within each.
    stage = np.where(split == TRAIN, 0, np.where(split == VALID, 1, 2))
    timestamp = np.empty_like(timestamp)
    timestamp[np.lexsort((np.arange(split.shape[0]), stage))] = np.arange(split.shape[0], dtype=np.int64)

    n_ent = ent_offset
    domain_of = np.concatenate(ent_domain)
    schema = FeatureSchema(
        domains=list(pair.domains),
        entity_types=["item"],
        entity_categorical=[CategoricalFeature(name="domain_of_origin", cardinality=len(pair.domains) + 1)],
        entity_numeric=[NumericFeature(name="log_popularity")],
        max_seq_len=max_seq_len,
    )
    n_users = user_ids.shape[0]
    return write_dataset(
        Path(out),
        schema=schema,
        users=Users(
            external_id=user_ids.astype(str),
            cat=np.zeros((n_users, 0), dtype=np.int32),
            num=np.zeros((n_users, 0), dtype=np.float32),
        ),
        entities=Entities(
            external_id=np.concatenate(ent_ids),
            entity_type=np.zeros(n_ent, dtype=np.int16),
            cat=(domain_of + 1).astype(np.int32)[:, None],
            num=train_log_popularity(entity, split, n_ent)[:, None],
            domain_mask=(np.uint64(1) << domain_of.astype(np.uint64)).astype(np.uint64),
        ),
        interactions=Interactions(
            user=user_row.astype(np.int32),
            entity=entity.astype(np.int32),
            domain=domain,
            timestamp=timestamp,
            split=split,
        ),
        meta={
            "source": source,
            "source_files": [str(root / f / n) for f in pair.folders for n in ("train.txt", "test.txt")],
            "time": "no timestamps in the data: file order used as time; timestamp is the row's position in "
            "(train rows of both domains, then validation rows, then test.txt rows), file order within each, so "
            "no held-out row precedes a training row of the same user in any domain",
            "split_policy": "shipped split kept: test.txt rows are test; the last train.txt row of each "
            "(user, domain) with >= 2 train rows is validation",
            "features": "entities: domain_of_origin (categorical), log_popularity from train rows only; "
            "users: none (behaviour sequence only)",
        },
    )
