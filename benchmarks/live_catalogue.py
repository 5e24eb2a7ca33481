"""Live catalogue benchmark: insertion quality, upserts under load, visibility latency, pause soak.

Sections (``--sections``, any of):

* ``quality``: the bundle's last ``--held-out`` share of rows is cut off into a base bundle with a graph
  built offline (same M and ef_construction), then inserted online with their exact entity tensors
  (``LiveCatalogue.add_encoded``: the graph insertion alone). coverage@k of graph search against the
  exhaustive top-k of the full catalogue, online (base + overlay) beside the fresh rebuild (the
  bundle's own graph), on the same held-out users and search point;
* ``load``: one engine serving Poisson arrivals at ``--load`` x its measured capacity on
  ``--threads`` scoring threads; p50/p99 latency with no updates, then with a writer upserting batches
  of new entities through the whole path (validation, XADD to Redis, encode with the entity encoder,
  graph insertion, applied before the acknowledgement) as fast as it can; a second engine follows the
  log on a thread and records its lag (logged -> applied there);
* ``pauses``: the same load while the writer pauses ``--pauses`` entities one change each, picked from
  what the engine just returned; every answer is checked against the pauses acknowledged before its
  query started (graph and, for one query in ``--exhaustive-every``, exhaustive mode).

Prints tables and writes ``--json``. Everything runs in one process on this machine's cores: the
Redis round trips, the writer and the scoring threads share them (say what else ran).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from contracts.bundle import Bundle, load_bundle
from service.bench.search_bench import held_out_queries
from service.engine import MatchEngine, SearchParams, UserFeatures


def pct(xs: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


def ci95(xs: list[float]) -> float:
    a = np.asarray(xs, dtype=np.float64)
    return float(1.96 * a.std(ddof=1) / np.sqrt(a.size)) if a.size > 1 else 0.0


# ---- quality ---------------------------------------------------------------------------------------------
def subset_bundle(src: Bundle, out: Path, n: int) -> Path:
    """A bundle of the first ``n`` rows of ``src`` (same ONNX files), graph rebuilt with src's M / ef_construction."""
    from contracts.io import atomic_write_json, sha256_file
    from index_builder.build import build_index
    from index_builder.config import IndexConfig

    if (out / "graph_health.json").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    (out / "entities").mkdir(parents=True)
    m = json.loads(json.dumps(src.manifest))
    files = m["files"]
    for rel in files:
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel.startswith("entities/") and rel.endswith(".npy") and rel != m.get("entity_encoder", {}).get("cold_id_embedding"):
            arr = np.load(src.path / rel, mmap_mode="r", allow_pickle=False)
            np.save(dst, np.ascontiguousarray(arr[:n]), allow_pickle=False)
        else:
            shutil.copy2(src.path / rel, dst)
        files[rel] = {"sha256": sha256_file(dst), "bytes": dst.stat().st_size}
    for meta in m.get("entity_tensors", {}).values():
        meta["shape"] = [n, *meta["shape"][1:]]
    m["num_entities"] = n
    g = m.pop("graph")
    m.pop("calibration", None)
    m["bundle_version"] = f"{src.version}-first{n}"
    atomic_write_json(out / "manifest.json", m)
    cfg = IndexConfig(layers=int(g["layers"]), M=int(g["M"]), ef_construction=int(g["ef_construction"]), seed=int(g.get("seed", 0)),
                      threads=2)
    build_index(bundle=out, cfg=cfg)
    return out


def truncate_history(users: list[UserFeatures], n: int) -> list[UserFeatures]:
    """Drop history rows >= n (not in the base bundle), left-padding again: the same users on both sides."""
    out = []
    for u in users:
        s = np.asarray(u.seq)
        kept = s[(s >= 0) & (s < n)]
        seq = np.full(s.shape[0], -1, dtype=np.int64)
        if kept.size:
            seq[-kept.size :] = kept
        out.append(replace(u, seq=seq))
    return out


def quality(args: argparse.Namespace) -> dict[str, Any]:
    full = load_bundle(args.bundle)
    E = full.num_entities
    held = int(round(args.held_out * E))
    n90 = E - held
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = load_bundle(subset_bundle(full, work / f"{args.bundle.name}-first{n90}", n90))
    build_s = time.perf_counter() - t0
    q = held_out_queries(args.data, full, args.users, 0)
    users = truncate_history(list(q.features), n90)
    domains = [int(d) for d in q.domains]
    k = args.k
    cache = work / f"exhaustive-{args.bundle.name}-{len(users)}-k{k}.npy"
    if cache.exists():
        exact = np.load(cache)
    else:
        ref = MatchEngine(full, providers=["CPUExecutionProvider"], intra_op_threads=2, use_calibration=False)
        exact = np.stack([ref.match(u, d, k, mode="exhaustive").rows[:k] for u, d in zip(users, domains, strict=True)])
        np.save(cache, exact)
    params = SearchParams()  # the engine's default point on both sides (no calibration: the graphs differ)

    def coverage(engine: MatchEngine) -> tuple[list[float], float]:
        cov, pairs = [], []
        for i, (u, d) in enumerate(zip(users, domains, strict=True)):
            r = engine.match(u, d, k, mode="graph", params=params)
            cov.append(len(np.intersect1d(r.rows, exact[i])) / k)
            pairs.append(r.stats.pair_evaluations)
        return cov, float(np.mean(pairs))

    rebuild = MatchEngine(full, params=params, providers=["CPUExecutionProvider"], use_calibration=False)
    cov_rebuild, pairs_rebuild = coverage(rebuild)
    del rebuild
    out: dict[str, Any] = {"catalogue": E, "base_rows": n90, "inserted": held, "queries": len(users), "k": k,
                           "base_graph_build_s": round(build_s, 1),
                           "rebuild": {"coverage": float(np.mean(cov_rebuild)), "ci95": ci95(cov_rebuild), "pairs": pairs_rebuild}}
    # the base graph alone, before any insertion: what the overlay starts from (its pairs are the base's cost)
    base_engine = MatchEngine(base, params=params, providers=["CPUExecutionProvider"], use_calibration=False)
    cov_base, pairs_base = [], []
    for i, (u, d) in enumerate(zip(users, domains, strict=True)):
        r = base_engine.match(u, d, k, mode="graph", params=params)
        cov_base.append(len(np.intersect1d(r.rows, exact[i])) / k)  # the held-out rows cannot be found
        pairs_base.append(r.stats.pair_evaluations)
    out["base_only"] = {"coverage": float(np.mean(cov_base)), "pairs": float(np.mean(pairs_base))}
    del base_engine
    for efc in args.ef_construction:
        live_engine = MatchEngine(base, params=params, providers=["CPUExecutionProvider"], use_calibration=False,
                                  live_capacity=held, live_ef_construction=efc)
        live = live_engine.live
        assert live is not None
        names = list(live.tables)
        aid_src = np.asarray(np.load(full.path / full.manifest["entity_encoder"]["id_embedding"], mmap_mode="r"))
        t1 = time.perf_counter()
        with live.lock:
            for r in range(n90, E):
                live.add_encoded(str(full.entity_ids[r]), int(full.entity_type[r]), int(full.domain_mask[r]),
                                 {nm: full.entity_tensors[nm][r] for nm in names}, np.asarray(full.vectors[r]), aid_src[r])  # type: ignore[index]
        ins_s = time.perf_counter() - t1
        cov_live, pairs_live = coverage(live_engine)
        ov = live.overlay
        out[f"online_efc{efc}"] = {
            "coverage": float(np.mean(cov_live)), "ci95": ci95(cov_live), "pairs": pairs_live,
            "ratio_vs_rebuild": float(np.mean(cov_live)) / max(float(np.mean(cov_rebuild)), 1e-9),
            "insert_s": round(ins_s, 2), "inserts_per_s": round(held / ins_s, 1),
            "overridden_lists": ov.overrides if ov is not None else 0,
        }
        print(f"[quality] efc={efc}: online coverage {np.mean(cov_live):.4f} vs rebuild {np.mean(cov_rebuild):.4f} "
              f"({held} inserted at {held / ins_s:.0f}/s)", flush=True)
        del live_engine
    return out


# ---- load ------------------------------------------------------------------------------------------------
class Load:
    """Open-loop Poisson arrivals at ``rate`` per second onto ``threads`` scoring threads; latency from arrival."""

    def __init__(self, engine: MatchEngine, users: list[UserFeatures], domains: list[int], k: int, threads: int,
                 check: Any = None, exhaustive_every: int = 0) -> None:
        self.engine, self.users, self.domains, self.k = engine, users, domains, k
        self.threads = threads
        self.check = check
        self.exhaustive_every = exhaustive_every

    def capacity(self, seconds: float) -> float:
        stop = time.perf_counter() + seconds
        done = [0] * self.threads

        def worker(t: int) -> None:
            i = t
            while time.perf_counter() < stop:
                self.engine.match(self.users[i % len(self.users)], self.domains[i % len(self.users)], self.k)
                done[t] += 1
                i += self.threads

        ts = [threading.Thread(target=worker, args=(t,)) for t in range(self.threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return sum(done) / seconds

    def run(self, rate: float, seconds: float, seed: int = 0) -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        arrivals = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * seconds * 1.2) + 10))
        arrivals = arrivals[arrivals < seconds]
        work: queue.Queue[tuple[int, float] | None] = queue.Queue()
        lat: list[float] = []
        lock = threading.Lock()
        start = time.perf_counter()

        def worker() -> None:
            while (item := work.get()) is not None:
                i, at = item
                u, d = self.users[i % len(self.users)], self.domains[i % len(self.users)]
                snap = self.check.snapshot() if self.check is not None else None
                mode = "exhaustive" if self.exhaustive_every and i % self.exhaustive_every == 0 else None
                r = self.engine.match(u, d, self.k, mode=mode)
                done = time.perf_counter()
                if self.check is not None:
                    self.check.verify(snap, r.rows, mode or "graph")
                with lock:
                    lat.append(done - (start + at))

        ts = [threading.Thread(target=worker) for _ in range(self.threads)]
        for t in ts:
            t.start()
        for i, at in enumerate(arrivals.tolist()):
            delay = start + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            work.put((i, at))
        for _ in ts:
            work.put(None)
        for t in ts:
            t.join()
        ms = np.asarray(lat) * 1e3
        return {"requests": int(ms.size), "rate": rate, "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99), "mean_ms": float(ms.mean())}


def new_entities(data: Path, n: int, seed: int, schema: Any) -> list[dict[str, Any]]:
    """``n`` upsert items with features of random dataset entities and fresh ids."""
    from contracts.schema import cat_slices

    cat = np.load(data / "entities/cat.npy", mmap_mode="r")
    num = np.load(data / "entities/num.npy", mmap_mode="r")
    etype = np.load(data / "entities/entity_type.npy", mmap_mode="r")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, etype.shape[0], n)
    slices = cat_slices(schema.entity_categorical)
    out = []
    for j, r in enumerate(rows.tolist()):
        c = {col.name: (cat[r, sl].tolist() if col.values > 1 else int(cat[r, sl.start]))
             for col, sl in zip(schema.entity_categorical, slices, strict=True)}
        out.append({"entity_id": f"live-{seed}-{j}", "entity_type": schema.entity_types[int(etype[r])],
                    "domains": list(schema.domains), "categorical": c,
                    "numeric": {col.name: float(num[r, i]) for i, col in enumerate(schema.entity_numeric)}})
    return out


class Writer:
    """Logs and applies changes as the acknowledging worker does, on a thread of its own.

    ``mode``: ``thread`` = the service's path (validate, ``ChangeFollower.acknowledge``: XADD, hand the
    parsed change to the applier thread, wait for it); ``inline`` = the same, applied in this thread
    (no applier thread running); ``inline-replay`` = the path before the applier: validate, XADD, then
    catch up from the stream in this thread, decoding and parsing its own entry again.
    """

    def __init__(self, follower: Any, schema: Any, mode: str = "thread") -> None:
        self.follower, self.schema, self.mode = follower, schema, mode
        self.ack_s: list[float] = []
        self.items = 0
        self.changes = 0
        self.cpu_s = 0.0  # this thread's CPU time in submit (validate, JSON, XADD, and the apply when inline)

    def submit(self, change: dict[str, Any]) -> None:
        from service.live import check_change

        t0 = time.perf_counter()
        c0 = time.thread_time()
        records = check_change(self.schema, change)
        if self.mode == "inline-replay":
            pos = self.follower.log.append(change)
            res = self.follower.catch_up(pos)
        else:
            pos, res = self.follower.acknowledge(change, records)
        if res is None:
            raise RuntimeError(f"change {pos} not applied")
        self.cpu_s += time.thread_time() - c0
        self.ack_s.append(time.perf_counter() - t0)
        self.changes += 1
        self.items += len(change.get("entities") or change.get("ids") or [])


def load(args: argparse.Namespace) -> dict[str, Any]:
    from service.changes import ChangeFollower, ChangeLog, stream_key

    bundle = load_bundle(args.bundle)
    q = held_out_queries(args.data, bundle, args.users, 1)
    users, domains = list(q.features), [int(d) for d in q.domains]
    prefix = f"bench-live-{uuid.uuid4().hex[:8]}:"
    total = args.batch * 200000
    cap = min(args.capacity, total)
    a = MatchEngine(bundle, providers=["CPUExecutionProvider"], live_capacity=cap, live_ef_construction=args.ef_construction[0],
                    search_loop=args.search_loop)
    b = MatchEngine(bundle, providers=["CPUExecutionProvider"], live_capacity=cap, live_ef_construction=args.ef_construction[0],
                    search_loop=args.search_loop) if args.follower == "thread" else a  # no second worker: not built
    a.warmup()
    assert a.live is not None and b.live is not None
    for eng in (a, b):
        if eng.live.overlay is not None:
            eng.live.overlay.native = args.insert == "compiled"
    if args.insert == "compiled" and a.live.overlay is not None:  # compile the kernels before the clock starts
        warm = GraphOverlayWarmup(a)
        warm.run()
    log_a = ChangeLog.from_url(args.redis_url, stream_key(prefix, a.live.lineage))
    log_b = ChangeLog.from_url(args.redis_url, stream_key(prefix, b.live.lineage))
    prio = args.apply_priority
    fa = ChangeFollower(log_a, a.live, poll_s=args.poll_s, priority=prio)
    fb = ChangeFollower(log_b, b.live, poll_s=args.poll_s, priority=prio)
    out: dict[str, Any] = {"catalogue": bundle.num_entities, "threads": args.threads, "k": args.k, "batch": args.batch,
                           "upsert_rate_offered": args.upsert_rate,
                           "ef_construction": args.ef_construction[0], "poll_s": args.poll_s,
                           "insert": args.insert, "search_loop": args.search_loop, "follower": args.follower,
                           "writer_nice": args.writer_nice, "applier": args.applier, "apply_priority": prio,
                           "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    try:
        ld = Load(a, users, domains, args.k, args.threads)
        capacity = ld.capacity(args.capacity_s)
        rate = args.load * capacity
        out["capacity_rps"] = capacity
        print(f"[load] capacity {capacity:.1f} req/s on {args.threads} threads; offered {rate:.1f} req/s", flush=True)
        out["baseline"] = ld.run(rate, args.seconds, seed=1)
        out["baseline"]["loadavg"] = os.getloadavg()
        print(f"[load] baseline: {out['baseline']}", flush=True)
        # with upserts (paced, or as fast as the writer goes); the second worker follows on its own thread
        if args.follower == "thread":
            fb.start()
            if args.writer_nice and fb._thread is not None and fb._thread.native_id is not None:
                lower_priority(args.writer_nice, fb._thread.native_id)
        for eng in {id(a): a, id(b): b}.values():
            eng.yield_live_changes(args.apply_yield_s, chunk=args.apply_chunk)
        if args.applier == "thread":
            fa.start()  # the acknowledging worker's applier thread (at --apply-priority)
        writer = Writer(fa, bundle.schema, args.applier)
        stop = threading.Event()
        items = new_entities(args.data, min(cap, args.batch * 100000), 7, bundle.schema)

        def write() -> None:
            lower_priority(args.writer_nice)
            i = 0
            t_start = time.perf_counter()
            while not stop.is_set() and i + args.batch <= len(items):
                if args.upsert_rate > 0:  # paced: the batch is due when the rate says so
                    due = t_start + i / args.upsert_rate - time.perf_counter()
                    if due > 0:
                        time.sleep(due)
                writer.submit({"op": "upsert", "entities": items[i : i + args.batch]})
                i += args.batch

        wt = threading.Thread(target=write)
        ins0 = a.live.overlay.insert_s if a.live.overlay is not None else 0.0
        enc0 = a.live.encode_s
        acpu0 = fa.apply_cpu_s
        t0 = time.perf_counter()
        wt.start()
        res = ld.run(rate, args.seconds, seed=1)
        stop.set()
        wt.join()
        wall = time.perf_counter() - t0
        applier_cpu = fa.apply_cpu_s - acpu0 if args.applier == "thread" else 0.0
        ov = a.live.overlay
        res.update(upserts=writer.items, upserts_per_s=writer.items / wall, changes=writer.changes,
                   ack_p50_ms=pct(writer.ack_s, 50) * 1e3, ack_p99_ms=pct(writer.ack_s, 99) * 1e3,
                   p99_ratio=res["p99_ms"] / out["baseline"]["p99_ms"],
                   p50_ratio=res["p50_ms"] / out["baseline"]["p50_ms"],
                   writer_cpu_us_per_upsert=(writer.cpu_s + applier_cpu) / max(writer.items, 1) * 1e6,
                   request_cpu_us_per_upsert=writer.cpu_s / max(writer.items, 1) * 1e6,
                   applier_cpu_us_per_upsert=applier_cpu / max(writer.items, 1) * 1e6,
                   own_fast=fa.own_fast, applier_priority=fa.priority_applied, apply_yield_s=args.apply_yield_s, apply_chunk=args.apply_chunk,
                   yield_waited_s=a.activity.waited_s,
                   insert_us_per_upsert=(ov.insert_s - ins0) / max(writer.items, 1) * 1e6 if ov is not None else 0.0,
                   encode_us_per_upsert=(a.live.encode_s - enc0) / max(writer.items, 1) * 1e6,
                   overlay_rows=a.live.count, overridden_lists=ov.overrides if ov is not None else 0,
                   loadavg=os.getloadavg())
        if args.follower == "thread":
            for _ in range(100):
                if b.live.position == a.live.position:
                    break
                time.sleep(0.05)
            lags = list(fb.lags)
            res.update(follower_lag_p50_ms=pct(lags, 50) * 1e3, follower_lag_p99_ms=pct(lags, 99) * 1e3,
                       follower_converged=b.live.position == a.live.position and b.live.count == a.live.count
                       and _same_graph(a, b))
        out["with_upserts"] = res
        print(f"[load] with upserts: {res}", flush=True)
        # the same arrivals again with the writer stopped: the overlay's own serving cost, and how much
        # the two windows without a writer differ (the noise any ratio above carries on this machine)
        after = ld.run(rate, args.seconds, seed=1)
        after.update(p99_ratio=after["p99_ms"] / out["baseline"]["p99_ms"], loadavg=os.getloadavg())
        out["after_no_writer"] = after
        print(f"[load] after, writer stopped: {after}", flush=True)
        out["loadavg_end"] = os.getloadavg()
    finally:
        fb.stop()
        for lg in (log_a,):
            lg.client.delete(lg.key)
            lg.client.close()
        log_b.client.close()
    return out


def lower_priority(by: int, tid: int | None = None) -> None:
    """Raise a thread's nice value by ``by`` (Linux: nice is per thread), so that the scoring threads win
    the cores and the writer runs on what they leave; allowed without privileges (only lowering is)."""
    if by > 0:
        tid = threading.get_native_id() if tid is None else tid
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + by)


def _same_graph(a: MatchEngine, b: MatchEngine) -> bool:
    """Both workers' overlays hold the same lists (slots and every used adjacency row)."""
    oa, ob = a.live.overlay if a.live else None, b.live.overlay if b.live else None
    if oa is None or ob is None:
        return oa is ob
    return bool(np.array_equal(oa._slot, ob._slot) and all(
        np.array_equal(x[:u], y[:u]) for x, y, u in zip(oa._adj, ob._adj, oa._used.tolist(), strict=True)))


class GraphOverlayWarmup:
    """Compile the insertion kernels (a first call takes seconds) on a throw-away overlay of the engine's graph."""

    def __init__(self, engine: MatchEngine) -> None:
        self.engine = engine

    def run(self) -> None:
        from service.overlay import GraphOverlay

        live = self.engine.live
        assert live is not None and live.overlay is not None
        ov = live.overlay
        tmp = GraphOverlay(ov.base, ov._base_vectors, capacity=2, M=ov.M, ef_construction=ov.ef_construction)
        tmp.insert_many(np.asarray(ov._base_vectors[:2]))


class PauseCheck:
    """Rows whose pause was acknowledged; each answer is checked against those acknowledged before it began."""

    def __init__(self, rows: int) -> None:
        self.acked = np.zeros(rows, dtype=bool)
        self.violations = {"graph": 0, "exhaustive": 0}
        self.checked = {"graph": 0, "exhaustive": 0}
        self.recent: list[int] = []
        self.lock = threading.Lock()

    def snapshot(self) -> np.ndarray:
        return self.acked.copy()

    def verify(self, snap: np.ndarray, rows: np.ndarray, mode: str) -> None:
        bad = int(snap[rows].sum())
        with self.lock:
            self.violations[mode] += bad
            self.checked[mode] += 1
            self.recent.extend(rows[:20].tolist())
            if len(self.recent) > 5000:
                del self.recent[:-5000]


def pauses(args: argparse.Namespace) -> dict[str, Any]:
    from service.changes import ChangeFollower, ChangeLog, stream_key

    bundle = load_bundle(args.bundle)
    q = held_out_queries(args.data, bundle, args.users, 2)
    users, domains = list(q.features), [int(d) for d in q.domains]
    prefix = f"bench-live-{uuid.uuid4().hex[:8]}:"
    a = MatchEngine(bundle, providers=["CPUExecutionProvider"], live_capacity=16)
    a.warmup()
    assert a.live is not None
    lg = ChangeLog.from_url(args.redis_url, stream_key(prefix, a.live.lineage))
    fa = ChangeFollower(lg, a.live)
    check = PauseCheck(a.num_rows)
    ld = Load(a, users, domains, args.k, args.threads, check=check, exhaustive_every=args.exhaustive_every)
    capacity = ld.capacity(args.capacity_s)
    rate = args.load * capacity
    writer = Writer(fa, bundle.schema)
    done = threading.Event()
    paused: set[int] = set()

    def write() -> None:
        rng = np.random.default_rng(3)
        while len(paused) < args.pauses:
            with check.lock:
                pool = [r for r in check.recent if r not in paused]
            if pool:  # what was just returned: the rows a leak would show
                row = int(pool[int(rng.integers(0, len(pool)))])
            else:
                row = int(rng.integers(0, bundle.num_entities))
                if row in paused:
                    continue
            writer.submit({"op": "pause", "ids": [str(bundle.entity_ids[row])]})
            paused.add(row)
            check.acked[row] = True  # after the acknowledgement: answers that start from now on must not show it
        done.set()

    wt = threading.Thread(target=write)
    t0 = time.perf_counter()
    wt.start()
    runs: list[dict[str, Any]] = []
    try:
        while not done.is_set():
            runs.append(ld.run(rate, min(args.seconds, 10.0), seed=len(runs)))
    finally:
        wt.join()
        lg.client.delete(lg.key)
        lg.client.close()
    wall = time.perf_counter() - t0
    lat_p99 = max(r["p99_ms"] for r in runs)
    out = {"pauses": len(paused), "seconds": wall, "pauses_per_s": len(paused) / wall, "answers_checked": check.checked,
           "paused_returned": check.violations, "capacity_rps": capacity, "rate": rate, "worst_window_p99_ms": lat_p99,
           "ack_p99_ms": pct(writer.ack_s, 99) * 1e3, "from_recent_results": True, "loadavg": os.getloadavg()}
    print(f"[pauses] {out}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="bundle exported with an entity encoder, with a graph")
    p.add_argument("--data", type=Path, required=True, help="its dataset (held-out users, entity features)")
    p.add_argument("--work", type=Path, required=True, help="scratch directory (the base bundle, caches)")
    p.add_argument("--sections", default="quality,load,pauses")
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--held-out", type=float, default=0.1, help="share of the catalogue inserted online")
    p.add_argument("--ef-construction", type=lambda s: [int(x) for x in s.split(",")], default=[64],
                   help="online insertion ef_construction values to compare (quality); the first is used under load")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--load", type=float, default=0.5, help="offered load as a share of measured capacity")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--capacity-s", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=50, help="entities per upsert change")
    p.add_argument("--capacity", type=int, default=100_000, help="overlay rows under load")
    p.add_argument("--upsert-rate", type=float, default=0.0, help="entities per second the writer offers (0 = as fast as it can)")
    p.add_argument("--poll-s", type=float, default=0.1)
    p.add_argument("--pauses", type=int, default=10_000)
    p.add_argument("--exhaustive-every", type=int, default=10)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    p.add_argument("--insert", choices=("compiled", "numpy"), default="compiled",
                   help="graph insertion: the compiled kernels, or the numpy reference (before/after)")
    p.add_argument("--search-loop", choices=("fused", "compiled", "numpy"), default="fused",
                   help="the serving search loop: fused (the engine's default), compiled (the per-step loop), numpy (the loop "
                        "a live graph used before the compiled step walked the overlay)")
    p.add_argument("--writer-nice", type=int, default=0,
                   help="raise the writer's and the follower thread's nice value by this much (load section)")
    p.add_argument("--applier", choices=("thread", "inline", "inline-replay"), default="thread",
                   help="who applies the acknowledging worker's change: the applier thread (the service), the "
                        "writer's thread from its parsed change, or the writer's thread from the stream (the path before)")
    p.add_argument("--apply-yield-s", type=float, default=0.0,
                   help="the applier inserts 4 entities at a time, each after waiting (at most this long) for no "
                        "request in flight (UNIMATCH_LIVE_APPLY_YIELD_S; 0 = off)")
    p.add_argument("--apply-chunk", type=int, default=4, help="entities per insertion between waits (--apply-yield-s)")
    p.add_argument("--apply-priority", choices=("idle", "nice", "normal"), default="idle",
                   help="OS priority of the applier threads (UNIMATCH_LIVE_APPLY_PRIORITY; load section)")
    p.add_argument("--follower", choices=("thread", "none"), default="thread",
                   help="run the second worker (following the log) in this process, or not (load section)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    out: dict[str, Any] = {"bundle": str(args.bundle), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    sections = {"quality": quality, "load": load, "pauses": pauses}
    for name in args.sections.split(","):
        out[name] = sections[name](args)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
