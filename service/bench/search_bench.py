"""`unimatch bench search`: how well and how fast the NANN beam search retrieves (paper IV-B, Eqs. 26-27).

For held-out (user, domain) queries of a dataset — the test split's interactions as ground truth G_u,
the user's non-test history as the serving sequence — and for each k:

* **coverage@k** = |graph top-k n exhaustive top-k| / k (same model, same user): what the graph loses;
* **Recall-all@k** (exhaustive top-k vs G_u, Eq. 26) and **Recall-retrieval@k** (graph top-k, Eq. 27);
* pair evaluations per query and as a share of the catalogue (the graph holds every entity; a domain
  filter restricts what is returned, not where the search walks);
* latency p50/p99 per query, the share of it inside the scorer's onnxruntime calls, and the speed-up
  of the graph search over exhaustive scoring of the same model (p50 over p50);
* single-process throughput with one request per worker thread.

Side by side in the same run: a **two-tower baseline** bundle (``kind: two-tower``; score = inner
product of user and entity towers) searched with hnswlib's own k-NN, reported as its Recall-retrieval@k,
and a sweep of (ef, T) drawing coverage@k against the share of the catalogue scored (NANN Fig. 3),
optionally for several bundles (e.g. trained with and without the adversarial loss, NANN Fig. 7).

Timings are wall-clock on whatever machine runs it; on a shared machine compare only the ratios
measured in one run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from contracts.bundle import Bundle, load_bundle
from contracts.features import UserFeatures
from service.engine import MatchEngine, SearchParams


class BenchError(ValueError):
    """The benchmark cannot run on these inputs (schema mismatch, no held-out queries, bad options)."""


@dataclass(frozen=True)
class BenchConfig:
    bundle: Path
    data: Path
    users: int = 2000  # the paper evaluates on 2,000 users; fewer where exhaustive scoring is slow
    ks: tuple[int, ...] = (50, 200, 1000)
    # None: the bundle's calibration where it has one (what the service serves), else the engine defaults.
    params: SearchParams | None = None
    two_tower: Path | None = None
    sweep: bool = True
    sweep_k: int = 200
    sweep_users: int = 200  # the sweep repeats the search per operating point: a subset keeps it affordable
    sweep_bundles: tuple[tuple[str, Path], ...] = ()  # extra (label, bundle) series for the sweep plot
    throughput_threads: int = 0  # 0 = os.cpu_count()
    intra_op_threads: int = 1
    seed: int = 0
    cap_ks: bool = False  # the ks are the CLI default: cap them at the smallest domain instead of failing


@dataclass
class Queries:
    user_rows: np.ndarray  # (Q,) dataset user rows
    domains: np.ndarray  # (Q,) domain index
    truth: list[np.ndarray]  # per query: held-out entity rows (G_u)
    features: list[UserFeatures]


def held_out_queries(data: Path, bundle: Bundle, n: int, seed: int, *, split: str = "test",
                     per_domain: bool = False) -> Queries:
    """Sample up to ``n`` (user, domain) pairs with ``split`` interactions; features from the non-test history.

    ``per_domain``: ``n`` is split evenly over the domains that have such pairs (all of a domain's pairs
    when it has fewer), so that a small domain is not left with a handful of queries.
    """
    from contracts.dataset import SPLIT_NAMES, load_dataset, serving_sequences

    codes = {name: code for code, name in SPLIT_NAMES.items()}
    if split not in codes:
        raise BenchError(f"split must be one of {sorted(codes)}, got {split!r}")

    ds = load_dataset(data)
    if ds.schema.fingerprint() != bundle.schema.fingerprint():
        raise BenchError(f"{data}: dataset schema differs from the bundle's ({bundle.path}); export from this dataset")
    if len(ds.entities) != bundle.num_entities:
        raise BenchError(f"{data}: {len(ds.entities)} entities, bundle has {bundle.num_entities}")
    inter = ds.interactions
    test = np.flatnonzero(np.asarray(inter.split) == codes[split])
    if test.size == 0:
        raise BenchError(f"{data}: no {split} interactions to evaluate on")
    key = np.asarray(inter.user)[test].astype(np.int64) * ds.schema.num_domains + np.asarray(inter.domain)[test]
    keys, inverse = np.unique(key, return_inverse=True)
    rng = np.random.default_rng(seed)
    if per_domain:
        dom = keys % ds.schema.num_domains
        present = np.unique(dom)
        quota = -(-n // present.size)
        picks = []
        for d in present:
            pool = np.flatnonzero(dom == d)
            picks.append(rng.choice(pool, size=min(quota, pool.size), replace=False))
        chosen = np.sort(np.concatenate(picks))
    else:
        chosen = np.sort(rng.choice(keys.size, size=min(n, keys.size), replace=False))
    ent = np.asarray(inter.entity)[test]
    by_key = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[by_key], chosen)
    ends = np.searchsorted(inverse[by_key], chosen, side="right")
    seqs = serving_sequences(ds)
    users = keys[chosen] // ds.schema.num_domains
    domains = keys[chosen] % ds.schema.num_domains
    ucat, unum = np.asarray(ds.users.cat), np.asarray(ds.users.num)
    feats = [
        UserFeatures(cat=ucat[u].astype(np.int64), num=unum[u].astype(np.float32), seq=seqs[u].astype(np.int64))
        for u in users
    ]
    truth = [np.unique(ent[by_key[s:e]]) for s, e in zip(starts, ends, strict=True)]
    return Queries(user_rows=users, domains=domains, truth=truth, features=feats)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.isin(truth, found).sum() / truth.size)


def _ci95(x: Sequence[float]) -> float:
    a = np.asarray(x, dtype=np.float64)
    return float(1.96 * a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else float("nan")


def _pct(x: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(x, dtype=np.float64), q))


class TwoTower:
    """The two-tower baseline: its user encoder + hnswlib inner-product k-NN over its entity vectors."""

    def __init__(self, path: Path, *, M: int = 16, ef_construction: int = 200) -> None:
        import hnswlib
        import onnxruntime as ort

        from service.scoring.host import session_options

        self.bundle = load_bundle(path)
        if self.bundle.kind != "two-tower":
            raise BenchError(f"{path}: manifest kind is {self.bundle.kind!r}, expected 'two-tower'")
        if self.bundle.vectors is None:
            raise BenchError(f"{path}: no vector_space in the manifest")
        self.session = ort.InferenceSession(str(path / "user_encoder.onnx"), session_options(1), providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.out = "user_repr" if "user_repr" in [o.name for o in self.session.get_outputs()] else self.session.get_outputs()[0].name
        vec = np.ascontiguousarray(self.bundle.vectors, dtype=np.float32)
        self.vectors = vec
        self.indexes: dict[int, Any] = {}
        mask = np.asarray(self.bundle.domain_mask)
        by_set: dict[bytes, Any] = {}
        for d in range(self.bundle.schema.num_domains):
            rows = np.flatnonzero(mask & np.uint64(1 << d))
            sig = rows.tobytes()
            if sig not in by_set:  # domains with the same eligible set share one index
                idx = hnswlib.Index(space="ip", dim=vec.shape[1])
                idx.init_index(max_elements=max(rows.size, 1), M=M, ef_construction=ef_construction, random_seed=0)
                idx.add_items(vec[rows], rows)
                by_set[sig] = idx
            self.indexes[d] = by_set[sig]

    def user_vector(self, u: UserFeatures, domain: int) -> np.ndarray:
        feeds = {
            "user_cat": u.cat.reshape(1, -1).astype(np.int64),
            "user_num": u.num.reshape(1, -1).astype(np.float32),
            "seq": u.seq.reshape(1, -1).astype(np.int64),
            "domain": np.array([domain], np.int64),
        }
        (out,) = self.session.run([self.out], {k: v for k, v in feeds.items() if k in self.inputs})
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def search(self, u: UserFeatures, domain: int, k: int) -> tuple[np.ndarray, bool]:
        """hnswlib's k-NN; (rows, fell_back). hnswlib refuses when its search finds fewer than k (k close
        to a tiny catalogue): then the exact top-k is used and the fallback is counted in the report."""
        idx = self.indexes[domain]
        idx.set_ef(max(2 * k, 100))  # hnswlib's guidance: ef >= k; 2k keeps its own recall near 1
        try:
            labels, _ = idx.knn_query(self.user_vector(u, domain)[None, :], k=k)
        except RuntimeError:
            return self.exhaustive(u, domain, k), True
        return labels[0].astype(np.int64), False

    def exhaustive(self, u: UserFeatures, domain: int, k: int) -> np.ndarray:
        rows = np.flatnonzero(np.asarray(self.bundle.domain_mask) & np.uint64(1 << domain))
        s = self.vectors[rows] @ self.user_vector(u, domain)
        return rows[np.argsort(-s, kind="stable")[:k]]


def _eval_k(engine: MatchEngine, q: Queries, k: int, exhaustive_top: list[np.ndarray], params: SearchParams | None,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One k over every query. ``params`` None = as served: the engine's calibrated mode and point."""
    cov, r_all, r_ret, frac, lat, scorer_ms, total_ms, pairs, steps = [], [], [], [], [], [], [], [], []
    enc, elig, gather_ms, graph_mode = [], [], [], []
    calibrated = params is None and engine.calibration is not None
    for i, (u, d) in enumerate(zip(q.features, q.domains, strict=True)):
        res = engine.match(u, int(d), k, mode=None if calibrated else "graph", params=None if calibrated else params)
        graph_mode.append(res.mode == "graph")
        ex = exhaustive_top[i][:k]
        cov.append(len(np.intersect1d(res.rows, ex)) / k)
        r_all.append(_recall(ex, q.truth[i]))
        r_ret.append(_recall(res.rows, q.truth[i]))
        frac.append(res.stats.pair_evaluations / engine.bundle.num_entities)
        elig.append(res.stats.pair_evaluations / res.stats.eligible)
        lat.append(res.stats.total_ms)
        scorer_ms.append(res.stats.scorer_ms)
        total_ms.append(res.stats.total_ms)
        pairs.append(res.stats.pair_evaluations)
        steps.append(res.stats.steps)
        enc.append(res.stats.user_encode_ms)
        gather_ms.append(res.stats.gather_ms)
    ra, rr = float(np.mean(r_all)), float(np.mean(r_ret))
    return {
        "coverage": float(np.mean(cov)),
        "coverage_ci95": _ci95(cov),
        "recall_all": ra,
        "recall_retrieval": rr,
        "recall_retrieval_ci95": _ci95(r_ret),
        "recall_gap_relative": (ra - rr) / ra if ra > 0 else 0.0,
        "pair_evaluations": float(np.mean(pairs)),
        "scored_fraction": float(np.mean(frac)),
        "pairs_per_eligible": float(np.mean(elig)),
        "latency_ms_p50": _pct(lat, 50),
        "latency_ms_p99": _pct(lat, 99),
        "latency_ms_mean": float(np.mean(lat)),
        "scorer_time_share": float(np.sum(scorer_ms) / np.sum(total_ms)),
        # The search's own overhead: everything outside onnxruntime (gathers, visited set, top-n, Python). The
        # user encoder is the model's user-side onnxruntime call, so it counts as model time, not overhead.
        "outside_ort_share": float((np.sum(total_ms) - np.sum(scorer_ms) - np.sum(enc)) / np.sum(total_ms)),
        "gather_share": float(np.sum(gather_ms) / np.sum(total_ms)),
        "user_encode_share": float(np.sum(enc) / np.sum(total_ms)),
        "user_encode_ms_mean": float(np.mean(enc)),
        "steps_mean": float(np.mean(steps)),
        "graph_share": float(np.mean(graph_mode)),
        "calibrated": calibrated,
        "params": _params_of(engine, q, k, params),
    }


def _params_of(engine: MatchEngine, q: Queries, k: int, params: SearchParams | None) -> dict[str, Any]:
    """The operating point(s) used at this k: one, or per domain when calibrated."""
    if params is None and engine.calibration is not None:
        out: dict[str, Any] = {}
        for d in np.unique(q.domains).tolist():
            chosen = engine.calibrated(int(d), k)
            name = engine.bundle.schema.domains[int(d)]
            if chosen is None:
                out[name] = {"mode": "default"}
            else:
                mode, p = chosen
                out[name] = {"mode": mode, **({"ef": list(p.ef), "steps": list(p.steps), "top_n": list(p.top_n),
                                               "seed_history": p.seed_history} if mode == "graph" else {})}
        return {"per_domain": out}
    p = (params or engine.params).for_k(k)
    return {"ef": list(p.ef), "steps": list(p.steps), "top_n": list(p.top_n)}


def _throughput(engine: MatchEngine, q: Queries, k: int, threads: int) -> dict[str, float]:
    """Queries/s of one process with ``threads`` worker threads, one request per thread at a time."""
    work = list(zip(q.features, q.domains, strict=True))
    mode = None if engine.calibration is not None else "graph"  # as served when calibrated
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda ud: engine.match(ud[0], int(ud[1]), k, mode=mode), work))
    wall = time.perf_counter() - t0
    return {"threads": threads, "queries": len(work), "qps": len(work) / wall}


def sweep_points(base: SearchParams) -> list[tuple[str, SearchParams]]:
    """(label, params) operating points: every ef scaled, the bottom T varied (NANN Fig. 3).

    The bottom ef never drops below k (``SearchParams.for_k``), so scales below 1 narrow the upper layers.
    """
    points = []
    for t in (2, 4, 8, 16):
        for scale in (0.25, 0.5, 1.0, 2.0, 4.0):
            ef = tuple(max(1, int(round(e * scale))) for e in base.ef)
            points.append((f"T={t},ef={'/'.join(map(str, ef))}", replace(base, ef=ef, steps=(*base.steps[:-1], t))))
    return points


def _sweep(engine: MatchEngine, q: Queries, k: int, exhaustive_top: list[np.ndarray], base: SearchParams) -> list[dict]:
    out = []
    for label, p in sweep_points(base):
        cov, frac, lat = [], [], []
        for i, (u, d) in enumerate(zip(q.features, q.domains, strict=True)):
            res = engine.match(u, int(d), k, mode="graph", params=p)
            cov.append(len(np.intersect1d(res.rows, exhaustive_top[i][:k])) / k)
            frac.append(res.stats.pair_evaluations / engine.bundle.num_entities)
            lat.append(res.stats.total_ms)
        out.append({"label": label, "ef": list(p.for_k(k).ef), "steps": list(p.steps), "coverage": float(np.mean(cov)),
                    "scored_fraction": float(np.mean(frac)), "latency_ms_p50": _pct(lat, 50)})
    return out


def _subset(q: Queries, n: int) -> Queries:
    return Queries(q.user_rows[:n], q.domains[:n], q.truth[:n], q.features[:n])


def run_search_bench(cfg: BenchConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole benchmark; returns the JSON document (contract keys plus details)."""
    if not cfg.ks or min(cfg.ks) <= 0:
        raise BenchError(f"k values must be positive, got {cfg.ks}")
    bundle = load_bundle(cfg.bundle)
    if bundle.graph is None:
        raise BenchError(f"{cfg.bundle}: no graph; run `unimatch index build --bundle {cfg.bundle}` first")
    engine = MatchEngine(bundle, params=cfg.params, intra_op_threads=cfg.intra_op_threads, providers=["CPUExecutionProvider"])
    base = cfg.params or engine.params
    q = held_out_queries(cfg.data, bundle, cfg.users, cfg.seed)
    smallest = min(engine.eligible_count(int(d)) for d in np.unique(q.domains))
    if cfg.cap_ks and max(*cfg.ks, cfg.sweep_k) > smallest:
        cfg = replace(cfg, ks=tuple(sorted({min(k, smallest) for k in cfg.ks})), sweep_k=min(cfg.sweep_k, smallest))
        log(f"default k capped at {smallest}, the entities of the smallest evaluated domain: k = {cfg.ks}")
    kmax = max(*cfg.ks, cfg.sweep_k) if cfg.sweep else max(cfg.ks)  # the exhaustive reference serves every k
    if kmax > smallest:
        raise BenchError(f"k={kmax} exceeds the {smallest} entities of the smallest evaluated domain")
    engine.warmup()
    log(f"{len(q.features)} held-out queries, catalogue {bundle.num_entities:,}, provider {engine.provider}")
    # Exhaustive pass: the reference top-k (coverage, Recall-all) and the cost reference (latency).
    ex_top, ex_lat, ex_pairs = [], [], []
    t0 = time.perf_counter()
    for u, d in zip(q.features, q.domains, strict=True):
        r = engine.match(u, int(d), kmax, mode="exhaustive")
        ex_top.append(r.rows)
        ex_lat.append(r.stats.total_ms)
        ex_pairs.append(r.stats.pair_evaluations)
    log(f"exhaustive: {len(ex_top)} queries in {time.perf_counter() - t0:.1f} s, p50 {_pct(ex_lat, 50):.1f} ms")
    result: dict[str, Any] = {
        "catalogue_size": bundle.num_entities,
        "queries": len(q.features),
        "bundle": str(cfg.bundle),
        "bundle_version": bundle.version,
        "method": bundle.manifest.get("method"),
        "training_steps": (bundle.manifest.get("training") or {}).get("steps"),
        "data": str(cfg.data),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "provider": engine.provider,
                    "intra_op_threads": cfg.intra_op_threads},
        "exhaustive": {"latency_ms_p50": _pct(ex_lat, 50), "latency_ms_p99": _pct(ex_lat, 99),
                       "pair_evaluations": float(np.mean(ex_pairs))},
        "k": {},
        "two_tower": {},
        "calibration": None if engine.calibration is None else engine.calibration.summary(),
    }
    ex_scorer_ns = result["exhaustive"]["latency_ms_p50"] * 1e6 / max(np.mean(ex_pairs), 1)
    result["exhaustive"]["ns_per_pair"] = ex_scorer_ns
    for k in cfg.ks:
        t0 = time.perf_counter()
        row = _eval_k(engine, q, k, ex_top, cfg.params)
        row["speedup_vs_exhaustive"] = result["exhaustive"]["latency_ms_p50"] / row["latency_ms_p50"]
        # The floor: the same pairs scored at exhaustive-batch efficiency (ns/pair of the big batches).
        row["floor_ms"] = row["pair_evaluations"] * ex_scorer_ns / 1e6
        result["k"][str(k)] = row
        log(f"k={k}: coverage {row['coverage']:.4f}, scored {row['scored_fraction']:.2%}, "
            f"p50 {row['latency_ms_p50']:.1f} ms ({time.perf_counter() - t0:.1f} s)")
    threads = cfg.throughput_threads or (os.cpu_count() or 1)
    kt = cfg.sweep_k if cfg.sweep_k in cfg.ks else cfg.ks[0]
    result["throughput"] = {"k": kt, **_throughput(engine, q, kt, threads)}
    if cfg.two_tower is not None:
        tt = TwoTower(cfg.two_tower)
        if tt.bundle.num_entities != bundle.num_entities:
            raise BenchError(f"{cfg.two_tower}: {tt.bundle.num_entities} entities, the bundle has {bundle.num_entities}")
        for k in cfg.ks:
            found = [tt.search(u, int(d), k) for u, d in zip(q.features, q.domains, strict=True)]
            rr = [_recall(rows, q.truth[i]) for i, (rows, _) in enumerate(found)]
            ra = [_recall(tt.exhaustive(u, int(d), k), q.truth[i]) for i, (u, d) in enumerate(zip(q.features, q.domains, strict=True))]
            result["two_tower"][str(k)] = {"recall_retrieval": float(np.mean(rr)), "recall_retrieval_ci95": _ci95(rr),
                                           "recall_all": float(np.mean(ra)),
                                           "hnswlib_fallbacks": int(sum(fb for _, fb in found))}
        result["two_tower_bundle"] = str(cfg.two_tower)
        result["two_tower_method"] = tt.bundle.manifest.get("method")
    if cfg.sweep:
        sq = _subset(q, cfg.sweep_users)
        series = {str(bundle.manifest.get("method", "model")): _sweep(engine, sq, cfg.sweep_k, ex_top[: len(sq.features)], base)}
        for label, path in cfg.sweep_bundles:
            other = MatchEngine(load_bundle(path), params=base, intra_op_threads=cfg.intra_op_threads, providers=["CPUExecutionProvider"])
            oq = held_out_queries(cfg.data, other.bundle, cfg.sweep_users, cfg.seed)
            o_top = [other.match(u, int(d), cfg.sweep_k, mode="exhaustive").rows for u, d in zip(oq.features, oq.domains, strict=True)]
            series[label] = _sweep(other, oq, cfg.sweep_k, o_top, base)
        result["sweep"] = {"k": cfg.sweep_k, "queries": len(sq.features), "series": series}
    return result


def _share(row: dict[str, Any], key: str) -> str:
    """A share column; '—' for result files written before the column existed."""
    return f"{row[key]:.1%}" if key in row else "—"


def _describe(params: dict[str, Any]) -> str:
    if "per_domain" in params:
        return "calibrated: " + ", ".join(
            f"{d} {p['mode']}" + (f" ef {p['ef']} T {p['steps']}" + (" +history" if p.get("seed_history") else "")
                                  if p["mode"] == "graph" else "")
            for d, p in params["per_domain"].items())
    return f"ef {params['ef']}, T {params['steps']}, top-n {params['top_n']}"


def render_markdown(res: dict[str, Any], *, command: str, plot: str | None) -> str:
    lines = [
        f"# Search benchmark: {res['method']} on {Path(res['data']).name} ({res['catalogue_size']:,} entities)",
        "",
        f"Made by `{command}`",
        "",
        f"{res['queries']} held-out (user, domain) queries; provider {res['machine']['provider']}, "
        f"{res['machine']['intra_op_threads']} onnxruntime thread(s), {res['machine']['cpus']} CPUs "
        "(shared with other jobs: compare ratios from one run, not absolute times across runs).",
        "",
        "| k | mode | coverage@k | Recall-all@k | Recall-retrieval@k | two-tower Recall-retrieval@k | pairs/query | scored | p50 ms | p99 ms | scorer share | user encoder | outside onnxruntime (gathers) | floor ms | speed-up vs exhaustive |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in res["k"].items():
        tt = res.get("two_tower", {}).get(k, {}).get("recall_retrieval")
        share = r.get("graph_share", 1.0)
        mode = "graph" if share == 1.0 else "exhaustive" if share == 0.0 else f"{share:.0%} graph"
        lines.append(
            f"| {k} | {mode}{' (calibrated)' if r.get('calibrated') else ''} | {r['coverage']:.4f} ± {r['coverage_ci95']:.4f} | {r['recall_all']:.4f} | "
            f"{r['recall_retrieval']:.4f} ± {r['recall_retrieval_ci95']:.4f} | {'—' if tt is None else f'{tt:.4f}'} | "
            f"{r['pair_evaluations']:.0f} | {r['scored_fraction']:.2%} | {r['latency_ms_p50']:.2f} | {r['latency_ms_p99']:.2f} | "
            f"{r['scorer_time_share']:.1%} | {_share(r, 'user_encode_share')} | "
            f"{_share(r, 'outside_ort_share')} ({_share(r, 'gather_share')}) | {r['floor_ms']:.2f} | {r['speedup_vs_exhaustive']:.1f}× |"
        )
    ex = res["exhaustive"]
    lines += [
        "",
        f"Exhaustive scoring (same model): p50 {ex['latency_ms_p50']:.1f} ms, p99 {ex['latency_ms_p99']:.1f} ms, "
        f"{ex['pair_evaluations']:.0f} pairs/query, {ex['ns_per_pair']:.0f} ns/pair. "
        "*floor* = pairs/query × exhaustive ns/pair: the query time if the scorer ran at large-batch efficiency "
        "and nothing else cost anything. *scorer share*: time inside the pair scorer's onnxruntime calls; "
        "*user encoder*: the user-side ONNX graph, once per query; *outside onnxruntime*: everything else "
        "(entity-tensor gathers, in parentheses, visited set, top-n, Python): the overhead the issue bounds at 20%.",
        "",
        f"Throughput: {res['throughput']['qps']:.1f} queries/s at k={res['throughput']['k']} with "
        f"{res['throughput']['threads']} worker threads in one process.",
        "",
        "Search parameters per k (top layer first): " + "; ".join(f"k={k}: {_describe(r['params'])}" for k, r in res["k"].items()),
    ]
    if res.get("two_tower"):
        lines += ["", f"Two-tower baseline: `{res.get('two_tower_bundle')}` searched with hnswlib (inner product, ef = max(2k, 100)); "
                  "its exhaustive Recall-all@k: " + ", ".join(f"@{k} {v['recall_all']:.4f}" for k, v in res["two_tower"].items())
                  + "; queries where hnswlib could not return k results (exact top-k used): "
                  + ", ".join(f"@{k} {v.get('hnswlib_fallbacks', 0)}" for k, v in res["two_tower"].items())]
    if "sweep" in res:
        lines += ["", f"## ef/T sweep (k={res['sweep']['k']}, {res['sweep']['queries']} queries)", "",
                  "| series | T (bottom) | ef per layer | coverage | scored | p50 ms |", "|---|---|---|---|---|---|"]
        for name, pts in res["sweep"]["series"].items():
            for p in pts:
                ef = [*p["ef"][:-1], max(p["ef"][-1], res["sweep"]["k"])]  # effective: the bottom ef is at least k
                lines.append(f"| {name} | {p['steps'][-1]} | {'/'.join(map(str, ef))} | {p['coverage']:.4f} | "
                             f"{p['scored_fraction']:.2%} | {p['latency_ms_p50']:.2f} |")
        if plot:
            lines += ["", f"![coverage vs share scored]({Path(plot).name})"]
    return "\n".join(lines) + "\n"


def render_plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v"
    for si, (name, pts) in enumerate(res["sweep"]["series"].items()):
        by_t: dict[int, list[dict]] = {}
        for p in pts:
            by_t.setdefault(p["steps"][-1], []).append(p)
        for t, ps in sorted(by_t.items()):
            ps = sorted(ps, key=lambda p: p["scored_fraction"])
            ax.plot([100 * p["scored_fraction"] for p in ps], [p["coverage"] for p in ps],
                    marker=markers[si % len(markers)], label=f"{name}, T={t}")
    from matplotlib.ticker import FormatStrFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("share of the catalogue scored (%, log scale)")
    ax.set_ylabel(f"coverage@{res['sweep']['k']}")
    ax.set_title(f"NANN beam search, {res['catalogue_size']:,} entities")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_outputs(res: dict[str, Any], *, json_path: Path | None, md_path: Path | None, plot_path: Path | None, command: str) -> None:
    from contracts.io import atomic_write_json, atomic_write_text

    if plot_path is not None and "sweep" in res:
        render_plot(res, plot_path)
    if json_path is not None:
        atomic_write_json(json_path, res)
    if md_path is not None:
        atomic_write_text(md_path, render_markdown(res, command=command, plot=str(plot_path) if plot_path else None))


def dumps(res: dict[str, Any]) -> str:
    return json.dumps(res, indent=2)
