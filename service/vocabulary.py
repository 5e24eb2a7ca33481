"""The names a request may use for one bundle, resolved to indices once at load, not per request.

A ``POST /match`` speaks in names (domain, entity types, user feature names, entity ids); the engine
speaks in indices and rows. This is the one table between them, built when a bundle is loaded
(``service.loading.build_serving``), so a request does dictionary lookups instead of ``list.index``
scans.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from contracts.bundle import Bundle


@dataclass(frozen=True)
class Vocabulary:
    domains: dict[str, int]  # domain name -> index
    entity_types: dict[str, int]  # entity type name -> index
    type_names: tuple[str, ...]  # index -> entity type name (answers name their entities' types)
    categorical: dict[str, tuple[int, int]]  # user categorical feature -> (column, cardinality)
    numeric: dict[str, int]  # user numeric feature -> column
    max_seq_len: int

    @classmethod
    def of(cls, bundle: Bundle) -> Vocabulary:
        schema = bundle.schema
        return cls(
            domains={name: i for i, name in enumerate(schema.domains)},
            entity_types={name: i for i, name in enumerate(schema.entity_types)},
            type_names=tuple(schema.entity_types),
            categorical={c.name: (i, c.cardinality) for i, c in enumerate(schema.user_categorical)},
            numeric={c.name: i for i, c in enumerate(schema.user_numeric)},
            max_seq_len=schema.max_seq_len,
        )


def rows_of(row_of: Callable[[str], int | None], entity_ids: Iterable[str]) -> tuple[np.ndarray, int]:
    """(int64 rows of the ids the catalogue holds, in order; how many ids it does not hold). ``row_of``
    is the bundle's map (user histories) or the engine's (results, with entities upserted online)."""
    rows: list[int] = []
    unknown = 0
    for e in entity_ids:
        r = row_of(e)
        if r is None:
            unknown += 1
        else:
            rows.append(r)
    return np.asarray(rows, dtype=np.int64), unknown
