"""Recall-all@N per domain and averaged (paper V-A4, Eq. 26): exhaustive scoring, no index.

For each sampled test user u and each domain k where u has test interactions, every entity eligible
in k (``domain_mask``) is scored with the model in k, and Recall-all@N = |G_u ∩ A_u| / |G_u| where
G_u is u's test entities in k and A_u the N highest-scored entities. The user's behaviour sequence
is the online feature (``serving_sequences``: all non-test history), exactly what the service sees.
Scoring is batched (users x entity chunks, a running top-N per user), so it is the same pair code
path as training and serving. "average" is the mean over domains of the per-domain recall (each
domain weighs the same, as in the paper's Table III); the per-(user, domain) micro average is
reported too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from contracts.dataset import TEST, TRAIN, Dataset, history_windows, serving_sequences
from contracts.io import atomic_write_json, atomic_write_text
from model.checkpoint import load_run
from model.config import Baseline, Device
from model.export import entity_tensors

if TYPE_CHECKING:
    from model.backbones import MatchingModel


@dataclass(frozen=True)
class EvalConfig:
    run: Path
    data: Path | None = None  # default: the dataset the run was trained on
    ns: tuple[int, ...] = (50, 200)
    max_users: int = 2000  # the paper evaluates 2,000 users
    seed: int = 0
    json: Path | None = None
    progress: bool = True
    # pairs scored per forward pass: bounds activation memory (pairs x 256 floats per expert layer)
    pair_budget: int = 32768
    device: Device = "cpu"


def history_sequences(ds: Dataset, target_split: int) -> np.ndarray:
    """(U, L) each user's latest interactions of the splits before ``target_split``.

    TEST targets see all non-test history (the online feature, ``serving_sequences``); VALID targets
    see only train history, so the validation interaction itself (and test) never enter the input.
    """
    if target_split == TEST:
        return serving_sequences(ds)
    inter = ds.interactions
    keep = np.asarray(inter.split) < target_split
    user = np.asarray(inter.user)[keep]
    entity = np.asarray(inter.entity)[keep]
    counts = np.bincount(user, minlength=len(ds.users))
    starts = np.zeros(len(ds.users) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    return history_windows(entity, starts[:-1], starts[1:], ds.schema.max_seq_len)


def sample_users(ds: Dataset, split: int, max_users: int, seed: int) -> np.ndarray:
    """Sorted distinct users with ``split`` interactions; at most ``max_users``, drawn with ``seed``."""
    inter = ds.interactions
    users = np.unique(np.asarray(inter.user)[np.asarray(inter.split) == split].astype(np.int64))
    if users.size > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, size=max_users, replace=False))
    return users


def sample_users_within(
    ds: Dataset, split: int, max_users: int, seed: int, *, pair_budget: int, min_users: int = 10
) -> np.ndarray:
    """Like ``sample_users``, but stops adding users once scoring them would pass ``pair_budget`` pairs.

    A user costs the eligible entities of every domain where they have ``split`` interactions. At
    least ``min_users`` are kept (or all there are) as long as they cost under ten budgets, so a
    small sample does not make the figure pure noise; beyond that (a catalogue of millions) only the
    users within the budget, possibly none.
    """
    users = sample_users(ds, split, ds.interactions.split.shape[0], seed)  # all of them, in sorted order
    if users.size == 0:
        return users
    order = np.random.default_rng(seed).permutation(users)[:max_users]
    inter = ds.interactions
    sel = np.asarray(inter.split) == split
    eligible = np.array([int(ds.entities.in_domain(k).sum()) for k in range(ds.schema.num_domains)], dtype=np.int64)
    key = np.unique(np.asarray(inter.user)[sel].astype(np.int64) * ds.schema.num_domains + np.asarray(inter.domain)[sel])
    cost = np.bincount(key // ds.schema.num_domains, weights=eligible[key % ds.schema.num_domains], minlength=len(ds.users))
    total = np.cumsum(cost[order])
    keep = int((total <= pair_budget).sum())
    floor = min(min_users, order.size)
    if keep < floor and total[floor - 1] < 10 * pair_budget:
        keep = floor
    return np.sort(order[:keep])


@torch.no_grad()
def recall_all(
    model: MatchingModel,
    ds: Dataset,
    users: np.ndarray,
    ns: tuple[int, ...],
    *,
    split: int = TEST,
    device: str = "cpu",
    pair_budget: int = 32768,
    progress: bool = False,
) -> tuple[dict[str, dict[str, float]], dict[str, int], dict[str, float]]:
    """Recall-all@N of ``model`` on the ``split`` interactions of ``users`` (Eq. 26).

    Returns (per domain ``{"<N>": recall}``, users per domain, per-(user, domain) micro average).
    The model is left in eval mode.
    """
    from rich.progress import Progress

    model.eval()
    dev = torch.device(device)
    schema = ds.schema
    inter = ds.interactions
    sel_split = np.asarray(inter.split) == split
    t_user = np.asarray(inter.user)[sel_split].astype(np.int64)
    t_ent = np.asarray(inter.entity)[sel_split].astype(np.int64)
    t_dom = np.asarray(inter.domain)[sel_split].astype(np.int64)
    chosen = np.isin(t_user, users)
    seqs = history_sequences(ds, split)
    ents = {n: torch.from_numpy(v).to(dev) for n, v in entity_tensors(model, len(ds.entities), device=dev).items()}
    n_max = max(ns)
    per_domain: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    micro_hits: dict[int, list[float]] = {n: [] for n in ns}
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("recall-all", total=int(chosen.sum()))
        for k, name in enumerate(schema.domains):
            sel = chosen & (t_dom == k)
            if not sel.any():
                continue
            eligible = np.flatnonzero(ds.entities.in_domain(k))
            truth: dict[int, set[int]] = {}
            for u, e in zip(t_user[sel], t_ent[sel], strict=True):
                truth.setdefault(int(u), set()).add(int(e))
            dom_users = np.array(sorted(truth), dtype=np.int64)
            ent_k = {n: v[torch.from_numpy(eligible).to(dev)] for n, v in ents.items()}
            chunk = max(256, min(len(eligible), pair_budget // 16))
            bu = max(1, pair_budget // chunk)
            recalls: dict[int, list[float]] = {n: [] for n in ns}
            for start in range(0, dom_users.size, bu):
                ub = dom_users[start : start + bu]
                dom = torch.full((ub.size,), k, dtype=torch.long, device=dev)
                user = model.user(
                    torch.from_numpy(np.asarray(ds.users.cat[ub], dtype=np.int64)).to(dev),
                    torch.from_numpy(np.asarray(ds.users.num[ub], dtype=np.float32)).to(dev),
                    torch.from_numpy(seqs[ub].astype(np.int64)).to(dev),
                    dom,
                )
                best_s = torch.full((ub.size, 0), -torch.inf, device=dev)
                best_i = torch.zeros((ub.size, 0), dtype=torch.long, device=dev)
                for c0 in range(0, eligible.size, chunk):
                    part = {n: v[c0 : c0 + chunk] for n, v in ent_k.items()}
                    logits, _ = model.score(user, part, dom)  # (Bu, chunk)
                    idx = torch.arange(c0, c0 + logits.shape[1], device=dev).expand(ub.size, -1)
                    s = torch.cat([best_s, logits], dim=1)
                    i = torch.cat([best_i, idx], dim=1)
                    top = torch.topk(s, min(n_max, s.shape[1]), dim=1)
                    best_s, best_i = top.values, torch.gather(i, 1, top.indices)
                ranked = eligible[best_i.cpu().numpy()]  # (Bu, N_max) entity rows, best first
                for row, u in enumerate(ub):
                    g = truth[int(u)]
                    for n in ns:
                        hit = len(g.intersection(ranked[row, :n].tolist())) / len(g)
                        recalls[n].append(hit)
                        micro_hits[n].append(hit)
                bar.update(task, advance=int(sum(len(truth[int(u)]) for u in ub)))
            per_domain[name] = {str(n): float(np.mean(recalls[n])) for n in ns}
            counts[name] = int(dom_users.size)
    micro = {str(n): float(np.mean(micro_hits[n])) if micro_hits[n] else 0.0 for n in ns}
    return per_domain, counts, micro


def average_over_domains(per_domain: dict[str, dict[str, float]], ns: tuple[int, ...]) -> dict[str, float]:
    """The documented Recall-all: the mean over domains of the per-domain recall (Table III)."""
    return {str(n): float(np.mean([per_domain[d][str(n)] for d in per_domain])) for n in ns}


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Compute Recall-all@N; writes RUN/eval.json, RUN/eval.md and ``cfg.json`` if given."""
    t0 = time.perf_counter()
    loaded = load_run(cfg.run, data=cfg.data)
    model, ds = loaded.model, loaded.dataset
    model.to(torch.device(cfg.device))
    users = sample_users(ds, TEST, cfg.max_users, cfg.seed)
    if users.size == 0:
        raise ValueError(f"{ds.root}: no test interactions to evaluate")
    per_domain, counts, micro = recall_all(
        model, ds, users, cfg.ns, split=TEST, device=cfg.device, pair_budget=cfg.pair_budget, progress=cfg.progress
    )
    result: dict[str, Any] = {
        "recall_all": {**per_domain, "average": average_over_domains(per_domain, cfg.ns)},
        "recall_all_micro": micro,
        "users": counts,
        "num_users": int(users.size),
        "method": loaded.cfg.method,
        "steps": int(loaded.state.get("step", 0)),
        "checkpoint": loaded.checkpoint,
        "dataset": str(ds.root),
        "seconds": time.perf_counter() - t0,
    }
    run = Path(cfg.run)
    atomic_write_json(run / "eval.json", result)
    atomic_write_text(run / "eval.md", markdown_table(result) + "\n")
    if cfg.json is not None:
        atomic_write_json(Path(cfg.json), result)
    return result


def popularity_recall(
    ds: Dataset, users: np.ndarray, ns: tuple[int, ...]
) -> tuple[dict[str, dict[str, float]], dict[str, int], dict[str, float]]:
    """Recall-all@N of the popularity baseline on the test interactions of ``users``.

    Every user of domain k gets the same list: the entities eligible in k ranked by their train
    interaction count in k (ties in entity order, so the list is deterministic). Measured as
    ``recall_all`` measures a model (G_u a set, hits / |G_u| per user, mean per domain); returns
    the same triple.
    """
    inter = ds.interactions
    split = np.asarray(inter.split)
    user = np.asarray(inter.user).astype(np.int64)
    entity = np.asarray(inter.entity).astype(np.int64)
    domain = np.asarray(inter.domain)
    E = len(ds.entities)
    is_test = (split == TEST) & np.isin(user, users)
    per_domain: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    micro: dict[int, list[np.ndarray]] = {n: [] for n in ns}
    for k, name in enumerate(ds.schema.domains):
        test = is_test & (domain == k)
        if not test.any():
            continue
        eligible = np.flatnonzero(ds.entities.in_domain(k))
        pop = np.bincount(entity[(split == TRAIN) & (domain == k)], minlength=E)[eligible]
        ranked = eligible[np.argsort(-pop, kind="stable")]
        rank_of = np.full(E, np.iinfo(np.int64).max, dtype=np.int64)
        rank_of[ranked] = np.arange(ranked.size)
        pairs = np.unique(user[test] * E + entity[test])  # G_u is a set: a repeat counts once
        uniq, inv = np.unique(pairs // E, return_inverse=True)
        ranks = rank_of[pairs % E]
        per_domain[name] = {}
        for n in ns:
            per_user = np.bincount(inv, weights=(ranks < n).astype(np.float64)) / np.bincount(inv)
            per_domain[name][str(n)] = float(per_user.mean())
            micro[n].append(per_user)
        counts[name] = int(uniq.size)
    micro_avg = {str(n): float(np.concatenate(micro[n]).mean()) if micro[n] else 0.0 for n in ns}
    return per_domain, counts, micro_avg


def evaluate_baseline(
    data: Path, baseline: Baseline, *, ns: tuple[int, ...], max_users: int, seed: int, json: Path | None = None
) -> dict[str, Any]:
    """``unimatch eval --baseline popularity``: the model-free yardstick, on the users a model's eval draws."""
    from contracts.dataset import load_dataset

    if baseline != "popularity":
        raise ValueError(f"unknown baseline {baseline!r}; expected popularity")
    t0 = time.perf_counter()
    ds = load_dataset(Path(data))
    users = sample_users(ds, TEST, max_users, seed)
    if users.size == 0:
        raise ValueError(f"{ds.root}: no test interactions to evaluate")
    per_domain, counts, micro = popularity_recall(ds, users, ns)
    result: dict[str, Any] = {
        "recall_all": {**per_domain, "average": average_over_domains(per_domain, ns)},
        "recall_all_micro": micro,
        "users": counts,
        "num_users": int(users.size),
        "method": f"baseline:{baseline}",
        "dataset": str(ds.root),
        "seconds": time.perf_counter() - t0,
    }
    if json is not None:
        atomic_write_json(Path(json), result)
    return result


def markdown_table(result: dict[str, Any]) -> str:
    rec = result["recall_all"]
    ns = list(rec["average"])
    lines = [
        f"Recall-all@N, method `{result.get('method')}`"
        + (f" ({result['checkpoint']}, step {result.get('steps')})" if result.get("checkpoint") else "")
        + f", {result.get('num_users')} test users",
        "",
        "| domain | users | " + " | ".join(f"R@{n}" for n in ns) + " |",
        "|---|---:|" + "---:|" * len(ns),
    ]
    for name, vals in rec.items():
        if name == "average":
            continue
        lines.append(f"| {name} | {result['users'].get(name, '')} | " + " | ".join(f"{vals[n]:.4f}" for n in ns) + " |")
    lines.append("| **average over domains** | | " + " | ".join(f"**{rec['average'][n]:.4f}**" for n in ns) + " |")
    micro = result.get("recall_all_micro")
    if micro:
        lines += [
            "",
            "Recall-all (the figure above, JSON `recall_all`) is the mean over domains of each domain's mean over "
            "its test users. Per-query mean (JSON `recall_all_micro`; what `bench search` calls recall-all): "
            + ", ".join(f"@{n} {micro[n]:.4f}" for n in ns if n in micro),
        ]
    return "\n".join(lines)
