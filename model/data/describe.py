"""What a dataset holds: counts per domain and entity type, sparsity, sequence lengths, feature columns.

``describe_dataset`` computes a JSON-able summary of a dataset directory (the UMES view of paper
section IV-A: domains, entity types, user and entity features); ``render`` prints it as rich tables.
Everything is a ``bincount`` or a sort over the memory-mapped arrays (see ``docs/data.md`` for the
time it takes on the 1m synthetic preset).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from contracts.dataset import SPLIT_NAMES, TEST, TRAIN, VALID, Dataset, load_dataset, serving_sequences
from contracts.schema import cat_slices
from model.data.split import split_report

PERCENTILES = (0, 25, 50, 75, 90, 99, 100)


def _percentiles(x: np.ndarray) -> dict[str, float]:
    if x.size == 0:
        return {"mean": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}}
    q = np.percentile(x, PERCENTILES)
    return {"mean": float(x.mean()), **{f"p{p}": float(v) for p, v in zip(PERCENTILES, q, strict=True)}}


def describe_dataset(root: Path) -> dict[str, Any]:
    """Summarise the dataset at ``root`` (validated on load) as a JSON-serialisable dict."""
    ds = load_dataset(Path(root))
    s, it, ents, users = ds.schema, ds.interactions, ds.entities, ds.users
    split = np.asarray(it.split)
    user = np.asarray(it.user)
    entity = np.asarray(it.entity)
    domain = np.asarray(it.domain).astype(np.int64)
    etype = np.asarray(ents.entity_type).astype(np.int64)
    n_users, n_ent, n_int, K, T = len(users), len(ents), len(it), s.num_domains, s.num_entity_types

    by_dom_split = np.bincount(domain * 3 + split, minlength=K * 3).reshape(K, 3)
    # distinct users and entities per domain: count distinct (domain, id) pairs
    dom_users = np.bincount(_distinct(domain * n_users + user) // n_users, minlength=K)
    dom_ent_seen = np.bincount(_distinct(domain * n_ent + entity) // n_ent, minlength=K)
    # distinct (user, entity) pairs, overall and per domain: repeats do not fill more cells
    pair = user.astype(np.int64) * n_ent + entity
    n_pairs = int(_distinct(pair).size)
    dom_pairs = np.bincount(_distinct(domain * (n_users * n_ent) + pair) // (n_users * n_ent), minlength=K)
    mask = np.asarray(ents.domain_mask)
    report = dataset_split_report(ds)
    domains: dict[str, Any] = {}
    for k, name in enumerate(s.domains):
        eligible = int(ents.in_domain(k).sum()) if mask.size else 0
        total = int(by_dom_split[k].sum())
        cells = int(dom_users[k]) * eligible
        pairs = int(dom_pairs[k])
        domains[name] = {
            "interactions": {SPLIT_NAMES[j]: int(by_dom_split[k, j]) for j in (TRAIN, VALID, TEST)},
            "interactions_total": total,
            "queries": report["domains"][name]["queries"],
            "users": int(dom_users[k]),
            "eligible_entities": eligible,
            "entities_interacted": int(dom_ent_seen[k]),
            "distinct_user_entity_pairs": pairs,
            # share of (active user, eligible entity) cells with no interaction in this domain
            "sparsity": (1.0 - pairs / cells) if cells else 1.0,
        }

    inter_type = etype[entity]
    by_type_split = np.bincount(inter_type * 3 + split, minlength=T * 3).reshape(T, 3)
    ent_per_type = np.bincount(etype, minlength=T)
    types: dict[str, Any] = {}
    for t, name in enumerate(s.entity_types):
        types[name] = {
            "entities": int(ent_per_type[t]),
            "share_of_entities": float(ent_per_type[t] / n_ent) if n_ent else 0.0,
            "interactions": {SPLIT_NAMES[j]: int(by_type_split[t, j]) for j in (TRAIN, VALID, TEST)},
            "eligible_per_domain": {d: int((ents.in_domain(k) & (etype == t)).sum()) for k, d in enumerate(s.domains)},
        }

    history = np.bincount(user, minlength=n_users)
    non_test = np.bincount(user[split != TEST], minlength=n_users)
    seq = serving_sequences(ds)
    serving_len = (seq >= 0).sum(axis=1)

    features: list[dict[str, Any]] = []
    for group, cat_cols, num_cols, cat, num, types_of in (
        ("user", s.user_categorical, s.user_numeric, np.asarray(users.cat), np.asarray(users.num), None),
        ("entity", s.entity_categorical, s.entity_numeric, np.asarray(ents.cat), np.asarray(ents.num), etype),
    ):
        for c, sl in zip(cat_cols, cat_slices(cat_cols), strict=True):
            col = cat[:, sl.start]  # a multi-value column: its first code (0 = an empty bag)
            rows = _applicable(c.applies_to, s.entity_types, types_of, col.shape[0])
            features.append(
                {
                    "group": group,
                    "kind": "categorical",
                    "name": c.name,
                    "cardinality": c.cardinality,
                    "default": c.default,
                    "applies_to": c.applies_to,
                    "distinct_codes_seen": int(
                        np.count_nonzero(np.bincount(cat[:, sl][rows].ravel(), minlength=c.cardinality)[1:])
                        + (c.values == 1 and bool((col[rows] == 0).any()))
                    ),
                    "values": c.values,
                    "missing_share": float((col[rows] == 0).mean()) if rows.any() else 0.0,
                }
            )
        for j, nc in enumerate(num_cols):
            col = num[:, j]
            rows = _applicable(nc.applies_to, s.entity_types, types_of, col.shape[0])
            features.append(
                {
                    "group": group,
                    "kind": "numeric",
                    "name": nc.name,
                    "default": nc.default,
                    "applies_to": nc.applies_to,
                    "mean": float(col[rows].mean()) if rows.any() else 0.0,
                    "std": float(col[rows].std()) if rows.any() else 0.0,
                }
            )

    return {
        "path": str(ds.root),
        "name": ds.name,
        "source": ds.meta.get("source", "unknown"),
        "schema_fingerprint": s.fingerprint(),
        "notes": {
            k: ds.meta[k] for k in ("time", "split_policy", "domains", "features") if isinstance(ds.meta.get(k), str)
        },
        "counts": {
            "users": n_users,
            "entities": n_ent,
            "interactions": n_int,
            "domains": K,
            "entity_types": T,
            "interactions_by_split": {SPLIT_NAMES[j]: int((split == j).sum()) for j in (TRAIN, VALID, TEST)},
        },
        # share of (user, entity) cells with no interaction, over the whole catalogue
        "sparsity": 1.0 - n_pairs / (n_users * n_ent),
        "domains": domains,
        "entity_types": types,
        "sequence_lengths": {
            "max_seq_len": s.max_seq_len,
            "interactions_per_user": _percentiles(history),
            "history_before_test_per_user": _percentiles(non_test),
            "serving_sequence_length": _percentiles(serving_len),
            "users_without_history": int((non_test == 0).sum()),
        },
        "features": features,
        "split_warnings": report["warnings"],
    }


def dataset_split_report(ds: Dataset) -> dict[str, Any]:
    """``model.data.split.split_report`` of a loaded dataset."""
    it = ds.interactions
    return split_report(
        np.asarray(it.user), np.asarray(it.domain), np.asarray(it.split), domains=ds.schema.domains, num_users=len(ds.users)
    )


def split_table(report: dict[str, Any]) -> Table:
    """Per domain: interactions and queries (users evaluated) of each split."""
    t = Table(title="split per domain (interactions / queries = users with held-out interactions)")
    for col in ("domain", "users", "train", "validation", "test", "validation queries", "test queries"):
        t.add_column(col, justify="left" if col == "domain" else "right")
    for name, d in report["domains"].items():
        i, q = d["interactions"], d["queries"]
        t.add_row(
            name, f"{d['users']:,}", f"{i['train']:,}", f"{i['validation']:,}", f"{i['test']:,}",
            f"{q['validation']:,}", f"{q['test']:,}",
        )  # fmt: skip
    return t


def print_split_warnings(warnings: list[str], console: Console) -> None:
    for w in warnings:
        console.print(f"[yellow]warning[/yellow]: {w}", highlight=False, soft_wrap=True)


def _distinct(x: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an int64 array.

    Sort-based on purpose: numpy 2's hash-based ``np.unique`` took ~8 s per call on 10M int64 keys
    here, a sort and a neighbour comparison well under one.
    """
    s = np.sort(np.asarray(x, dtype=np.int64))
    if s.size == 0:
        return s
    keep = np.empty(s.shape[0], dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def _applicable(applies_to: list[str] | None, type_names: list[str], types_of: np.ndarray | None, n: int) -> np.ndarray:
    """Rows a (possibly type-specific) column really describes; the others hold its default."""
    if applies_to is None or types_of is None:
        return np.ones(n, dtype=bool)
    return np.isin(types_of, [type_names.index(t) for t in applies_to])


def _fmt_pct(row: dict[str, float]) -> list[str]:
    return [f"{row['mean']:.1f}"] + [f"{row[f'p{p}']:.0f}" for p in PERCENTILES]


def render(summary: dict[str, Any], console: Console | None = None) -> None:
    """Print the summary as rich tables."""
    # piped output (docs, CI logs) gets a fixed wide layout instead of rich's 80-column fallback
    con = console or Console(width=None if sys.stdout.isatty() else 150)
    c = summary["counts"]
    con.print(
        f"[bold]{summary['name']}[/bold]  source={summary['source']}  schema={summary['schema_fingerprint']}\n"
        f"{c['users']:,} users, {c['entities']:,} entities, {c['interactions']:,} interactions "
        f"(train {c['interactions_by_split']['train']:,} / validation {c['interactions_by_split']['validation']:,} / "
        f"test {c['interactions_by_split']['test']:,}), sparsity {summary['sparsity']:.6f}"
    )
    for key, text in summary["notes"].items():
        con.print(f"  {key}: {text}")

    t = Table(title="per domain")
    for col in ("domain", "train", "validation", "test", "test queries", "users", "eligible entities", "entities hit",
                "sparsity"):  # fmt: skip
        t.add_column(col, justify="left" if col == "domain" else "right")
    for name, d in summary["domains"].items():
        i = d["interactions"]
        t.add_row(
            name, f"{i['train']:,}", f"{i['validation']:,}", f"{i['test']:,}", f"{d['queries']['test']:,}",
            f"{d['users']:,}", f"{d['eligible_entities']:,}", f"{d['entities_interacted']:,}", f"{d['sparsity']:.6f}",
        )  # fmt: skip
    con.print(t)
    print_split_warnings(summary.get("split_warnings", []), con)

    t = Table(title="per entity type")
    for col in ("type", "entities", "share", "train", "validation", "test", "eligible per domain"):
        t.add_column(col, justify="left" if col in ("type", "eligible per domain") else "right")
    for name, d in summary["entity_types"].items():
        i = d["interactions"]
        elig = ", ".join(f"{k}={v:,}" for k, v in d["eligible_per_domain"].items())
        t.add_row(
            name, f"{d['entities']:,}", f"{d['share_of_entities']:.2%}", f"{i['train']:,}", f"{i['validation']:,}",
            f"{i['test']:,}", elig,
        )  # fmt: skip
    con.print(t)

    sl = summary["sequence_lengths"]
    t = Table(
        title=f"sequence lengths (max_seq_len {sl['max_seq_len']}; {sl['users_without_history']:,} users without history)"
    )
    t.add_column("per user", justify="left")
    for col in ["mean", *(f"p{p}" for p in PERCENTILES)]:
        t.add_column(col, justify="right")
    for label, key in (
        ("interactions (all splits)", "interactions_per_user"),
        ("history before test", "history_before_test_per_user"),
        ("serving sequence", "serving_sequence_length"),
    ):
        t.add_row(label, *_fmt_pct(sl[key]))
    con.print(t)

    t = Table(title="feature columns")
    for col in ("group", "kind", "name", "cardinality", "default", "applies to", "seen / missing", "mean / std"):
        t.add_column(col)
    for f in summary["features"]:
        cat = f["kind"] == "categorical"
        t.add_row(
            f["group"],
            f["kind"],
            f["name"],
            str(f["cardinality"]) if cat else "",
            str(f["default"]) if cat else f"{f['default']:.3g}",
            ", ".join(f["applies_to"]) if f["applies_to"] else "all",
            f"{f['distinct_codes_seen']} codes / {f['missing_share']:.1%} zero" if cat else "",
            "" if cat else f"{f['mean']:.3f} / {f['std']:.3f}",
        )
    if not summary["features"]:
        t.add_row("-", "-", "(no feature columns)", "", "", "", "", "")
    con.print(t)
