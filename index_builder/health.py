"""Graph health report: structure, connectivity, and L2 recall of a search over the *extracted* arrays.

The recall check (HNSW paper, Malkov & Yashunin 2018, algorithms 2 and 5: greedy descent with ef=1 on the
upper layers, best-first search with a candidate list of size ``ef`` on layer 0) runs on the CSR arrays
that the service memory-maps, against exact brute force, on a seeded sample of queries; the library's
own ``knn_query`` on the same queries is reported beside it. Equal recall (and a high overlap of the two
result lists) proves the extraction is faithful; the service itself never calls the library (paper
section IV-B: the model scores the candidates of a beam search over this graph).
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np

from contracts.graph import Graph


def sq_l2(vectors: np.ndarray, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    diff = np.asarray(vectors[rows], dtype=np.float32) - q
    return np.einsum("ij,ij->i", diff, diff)


def greedy_descent(graph: Graph, vectors: np.ndarray, q: np.ndarray) -> tuple[int, float]:
    """Upper layers, top down, ef=1: move to the nearest neighbour while it is closer (paper algorithm 5, l>0)."""
    eps = np.asarray(graph.entry_points, dtype=np.int64)
    d = sq_l2(vectors, eps, q)
    cur, cur_d = int(eps[d.argmin()]), float(d.min())
    for layer in range(graph.top_layer, 0, -1):
        while True:
            nb = graph.neighbours(layer, cur)
            if nb.size == 0:
                break
            d = sq_l2(vectors, nb, q)
            j = int(d.argmin())
            if d[j] >= cur_d:
                break
            cur, cur_d = int(nb[j]), float(d[j])
    return cur, cur_d


def search_layer0(
    graph: Graph, vectors: np.ndarray, q: np.ndarray, start: int, start_d: float, ef: int
) -> list[tuple[float, int]]:
    """Best-first search on layer 0 with ``ef`` results (paper algorithm 2); returns (distance, node) ascending."""
    visited = {start}
    candidates = [(start_d, start)]  # min-heap: nearest unexpanded first
    results = [(-start_d, start)]  # max-heap by distance (negated): the current ef best
    while candidates:
        d, node = heapq.heappop(candidates)
        if d > -results[0][0] and len(results) >= ef:
            break
        nb = graph.neighbours(0, node)
        fresh = [int(x) for x in nb if int(x) not in visited]
        if not fresh:
            continue
        visited.update(fresh)
        dist = sq_l2(vectors, np.asarray(fresh, dtype=np.int64), q)
        for dn, x in zip(dist.tolist(), fresh, strict=True):
            if len(results) < ef or dn < -results[0][0]:
                heapq.heappush(candidates, (dn, x))
                heapq.heappush(results, (-dn, x))
                if len(results) > ef:
                    heapq.heappop(results)
    return sorted((-nd, x) for nd, x in results)


def hnsw_search(graph: Graph, vectors: np.ndarray, q: np.ndarray, k: int, ef: int) -> np.ndarray:
    """Top-``k`` rows for query ``q`` by an HNSW search over the extracted arrays, nearest first."""
    q = np.asarray(q, dtype=np.float32)
    start, start_d = greedy_descent(graph, vectors, q)
    found = search_layer0(graph, vectors, q, start, start_d, max(ef, k))
    return np.array([x for _, x in found[:k]], dtype=np.int64)


def brute_force_knn(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 1 << 16) -> np.ndarray:
    """Exact top-``k`` rows by squared L2 for each query (chunked over the catalogue), nearest first.

    The chunk bounds the temporaries (distances, candidate ids, partition indices: ~20 bytes per query
    and row, ~260 MB for 200 queries); 4x larger chunks were the build's peak memory at 1M.
    """
    q = np.asarray(queries, dtype=np.float32)
    best_d = np.full((q.shape[0], 0), np.inf, dtype=np.float32)
    best_i = np.zeros((q.shape[0], 0), dtype=np.int64)
    for a in range(0, vectors.shape[0], chunk):
        x = np.asarray(vectors[a : a + chunk], dtype=np.float32)
        d = (x * x).sum(1)[None, :] - 2.0 * (q @ x.T)  # + |q|^2, the same for every row of a query
        cand_d = np.concatenate([best_d, d], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(a, a + x.shape[0]), d.shape)], axis=1)
        kk = min(k, cand_d.shape[1])
        part = np.argpartition(cand_d, kk - 1, axis=1)[:, :kk]
        best_d = np.take_along_axis(cand_d, part, 1)
        best_i = np.take_along_axis(cand_i, part, 1)
    order = np.argsort(best_d, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found ∩ truth| / |truth| over queries (rows)."""
    hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True)]
    return float(np.sum(hits) / truth.size) if truth.size else 0.0


def degree_stats(degrees: np.ndarray) -> dict[str, Any]:
    if degrees.size == 0:
        return {"min": 0, "mean": 0.0, "p50": 0, "p99": 0, "max": 0, "histogram": []}
    return {
        "min": int(degrees.min()),
        "mean": round(float(degrees.mean()), 3),
        "p50": int(np.percentile(degrees, 50)),
        "p99": int(np.percentile(degrees, 99)),
        "max": int(degrees.max()),
        # histogram[d] = number of nodes of the layer with out-degree d
        "histogram": np.bincount(degrees).tolist(),
    }


def structure_report(graph: Graph, reachable: list[np.ndarray]) -> dict[str, Any]:
    """Nodes, edges, degrees, nesting and connectivity per layer (``reachable`` from layer_reachability)."""
    levels = np.asarray(graph.levels)
    layers = []
    nesting_ok = True
    for layer in range(graph.num_layers):
        on = levels >= layer
        deg = graph.degrees(layer)
        nbr = np.asarray(graph.neighbors[layer])
        # nesting: no node off the layer has links there, and every link points to a node on the layer
        stray_rows = int(np.count_nonzero(deg[~on]))
        stray_links = int(np.count_nonzero(levels[nbr] < layer)) if nbr.size else 0
        nesting_ok &= stray_rows == 0 and stray_links == 0
        layers.append(
            {
                "layer": layer,
                "nodes": int(on.sum()),
                "edges": int(nbr.size),
                "degree": degree_stats(deg[on]),
                "zero_out_degree": int(np.count_nonzero(deg[on] == 0)),
                "reachable": int(np.count_nonzero(reachable[layer] & on)),
                "unreachable": int(np.count_nonzero(on & ~reachable[layer])),
                "links_off_layer": stray_links + stray_rows,
            }
        )
    ep = np.asarray(graph.entry_points)
    return {
        "layers": graph.num_layers,
        "nodes_per_layer": [x["nodes"] for x in layers],
        "edges_per_layer": [x["edges"] for x in layers],
        "entry_points": ep.tolist(),
        "entry_points_on_top_layer": bool(np.all(levels[ep] == graph.top_layer)),
        "nested": bool(nesting_ok),
        "all_reachable": all(x["unreachable"] == 0 for x in layers),
        "per_layer": layers,
    }


def sample_queries(vectors: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` entity vectors sampled without replacement (seeded), plus Gaussian noise of 0.1x the
    per-dimension standard deviation so that a query is not itself a node."""
    n = vectors.shape[0]
    rng = np.random.default_rng(seed + 1)
    rows = np.sort(rng.choice(n, size=min(count, n), replace=False))
    sample = np.asarray(vectors[rows], dtype=np.float32)
    std = np.asarray(vectors[np.sort(rng.choice(n, size=min(n, 10_000), replace=False))], np.float32).std(0)
    return (sample + 0.1 * std * rng.standard_normal(sample.shape)).astype(np.float32)


def recall_report(
    graph: Graph, vectors: np.ndarray, *, queries: int, k: int, ef: int, seed: int, library_index: Any = None
) -> dict[str, Any]:
    """L2 recall@k of the extracted-graph search (and the library's knn_query) vs brute force.

    Queries come from :func:`sample_queries`; the exact top-k is computed over the whole catalogue.
    """
    n = graph.num_nodes
    k = min(k, n)
    nq = min(queries, n)
    if nq == 0:
        return {"queries": 0, "k": k, "ef": ef}
    q = sample_queries(vectors, nq, seed)
    truth = brute_force_knn(vectors, q, k)
    found = np.stack([hnsw_search(graph, vectors, qi, k, ef) for qi in q])
    out: dict[str, Any] = {"queries": nq, "k": k, "ef": ef, "l2_recall": recall(found, truth)}
    if library_index is not None:
        library_index.set_ef(max(ef, k))
        lib, _ = library_index.knn_query(q, k=k)
        out["library_l2_recall"] = recall(lib.astype(np.int64), truth)
        # share of the library's top-k that the extracted search returns too (1.0 = identical result sets)
        out["overlap_with_library"] = recall(found, lib.astype(np.int64))
    return out
