"""HNSW INSERT into the live overlay, compiled with numba (``service.overlay`` calls these).

The same algorithm as ``GraphOverlay``'s numpy reference (``native=False``), step for step: Malkov &
Yashunin's Algorithm 1 (greedy descent with ef = 1 above the new node's level, then per layer a search
of the current graph with ``ef_construction`` candidates) and Algorithm 4 (the neighbour heuristic,
hnswlib's ``getNeighborsByHeuristic2``), with the reference's batched SEARCH-LAYER (every new beam
member expanded at once, the beam the first ``ef`` of a stable sort by distance) and its tie order, so
both give the same graph: tested on seeded cases (``tests/service/test_overlay_native.py``).

Why compiled: in numpy an insertion is ~100 array calls of a few microseconds each from Python (~3 ms
of CPU), and holding the GIL all along, it stalled the serving threads' Python. Here one call inserts a
whole change's entities, O(visited) work and no temporaries beyond small per-step arrays, with the GIL
released (``nogil``), so the scoring threads run beside it.

Distances are squared L2 in float64 over four interleaved partial sums (dimension j into sum j mod 4,
then (s0 + s1) + (s2 + s3)), the exact order ``overlay.l2_rows`` computes in numpy: the two agree to the
last bit, so a tie in the reference is a tie here.

Overlay state (owned by ``GraphOverlay``, preallocated, handed in as arrays):

* ``slot`` (layers, E + capacity) int32: the row's list on that layer is ``adj[layer][slot]``; -1: the
  base CSR list (base rows) or none (overlay rows above their level);
* ``adj`` one (slots, cap_layer) int32 array per layer, lists -1 padded, written without holes;
* ``used`` (layers,) int64: slots taken per layer. The caller makes sure enough are free first.

Publication order (one writer, lock-free readers): a new node's own lists are written, then its slot,
before any edge to it is added; an edited list is written in place, append = one int32 store.
"""

from __future__ import annotations

import numpy as np

from service.search_kernels import _compiled


@_compiled
def l2(a: np.ndarray, b: np.ndarray) -> float:
    """Squared L2 of two float32 vectors in float64, four interleaved partial sums (see the module doc)."""
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    d = a.size
    j = 0
    while j + 4 <= d:
        t0 = np.float64(a[j]) - np.float64(b[j])
        t1 = np.float64(a[j + 1]) - np.float64(b[j + 1])
        t2 = np.float64(a[j + 2]) - np.float64(b[j + 2])
        t3 = np.float64(a[j + 3]) - np.float64(b[j + 3])
        s0 += t0 * t0
        s1 += t1 * t1
        s2 += t2 * t2
        s3 += t3 * t3
        j += 4
    if j < d:
        t = np.float64(a[j]) - np.float64(b[j])
        s0 += t * t
    if j + 1 < d:
        t = np.float64(a[j + 1]) - np.float64(b[j + 1])
        s1 += t * t
    if j + 2 < d:
        t = np.float64(a[j + 2]) - np.float64(b[j + 2])
        s2 += t * t
    return (s0 + s1) + (s2 + s3)


@_compiled
def vector_of(base_vec: np.ndarray, over_vec: np.ndarray, E: int, r: int) -> np.ndarray:
    return base_vec[r] if r < E else over_vec[r - E]


@_compiled
def list_of(
    layer: int, r: int, E: int, offsets: tuple, neighbors: tuple, slot: np.ndarray, adj: tuple
) -> np.ndarray:
    """The current layer-``layer`` list of row ``r`` (a copy, int64): override / overlay row, else CSR."""
    s = slot[layer, r]
    if s >= 0:
        a = adj[layer]
        n = 0
        for j in range(a.shape[1]):
            if a[s, j] >= 0:
                n += 1
        out = np.empty(n, dtype=np.int64)
        m = 0
        for j in range(a.shape[1]):
            if a[s, j] >= 0:
                out[m] = a[s, j]
                m += 1
        return out
    if r >= E:
        return np.empty(0, dtype=np.int64)
    off = offsets[layer]
    nb = neighbors[layer]
    start = off[r]
    n = off[r + 1] - start
    out = np.empty(n, dtype=np.int64)
    for j in range(n):
        out[j] = nb[start + j]
    return out


@_compiled
def heuristic_kernel(rows: np.ndarray, dist: np.ndarray, base_vec: np.ndarray, over_vec: np.ndarray, E: int,
                     m: int) -> np.ndarray:
    """SELECT-NEIGHBORS-HEURISTIC (Algorithm 4, as ``overlay.heuristic``): nearest first, a candidate is
    kept when it is closer to the base element than to every candidate kept so far; at most ``m``."""
    order = np.argsort(dist, kind="mergesort")
    if rows.size <= m:
        return rows[order]
    kept = np.empty(m, dtype=np.int64)
    k = 0
    for ii in range(order.size):
        i = order[ii]
        vi = vector_of(base_vec, over_vec, E, rows[i])
        good = True
        for jj in range(k):
            if l2(vi, vector_of(base_vec, over_vec, E, kept[jj])) < dist[i]:
                good = False
                break
        if good:
            kept[k] = rows[i]
            k += 1
            if k == m:
                break
    return kept[:k]


@_compiled
def search_layer_l2(
    q: np.ndarray, ep: np.ndarray, ep_d: np.ndarray, ef: int, layer: int, max_steps: int,
    base_vec: np.ndarray, over_vec: np.ndarray, E: int, offsets: tuple, neighbors: tuple, slot: np.ndarray,
    adj: tuple, stamp: np.ndarray, gen: np.uint32,
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's batched SEARCH-LAYER in L2 (``GraphOverlay._search_layer``): expand every new
    beam member at once until none enters; the beam is the first ``ef`` of a stable sort by distance of
    (beam, new rows ascending). Returns the beam nearest first."""
    for i in range(ep.size):
        stamp[ep[i]] = gen
    w = ep
    w_d = ep_d
    if w.size > ef:
        keep = np.argsort(w_d, kind="mergesort")[:ef]
        w = w[keep]
        w_d = w_d[keep]
    frontier = w
    off = offsets[layer]
    nbs = neighbors[layer]
    a = adj[layer]
    for _ in range(max_steps):
        total = 0
        for i in range(frontier.size):
            f = frontier[i]
            s = slot[layer, f]
            if s >= 0:
                total += a.shape[1]
            elif f < E:
                total += off[f + 1] - off[f]
        cand = np.empty(total, dtype=np.int64)
        m = 0
        for i in range(frontier.size):
            f = frontier[i]
            s = slot[layer, f]
            if s >= 0:
                for j in range(a.shape[1]):
                    r = a[s, j]
                    if r >= 0 and stamp[r] != gen:
                        cand[m] = r
                        m += 1
            elif f < E:
                for j in range(off[f], off[f + 1]):
                    r = np.int64(nbs[j])
                    if stamp[r] != gen:
                        cand[m] = r
                        m += 1
        if m == 0:
            break
        nb = np.unique(cand[:m])
        nb_d = np.empty(nb.size, dtype=np.float64)
        for i in range(nb.size):
            stamp[nb[i]] = gen
            nb_d[i] = l2(q, vector_of(base_vec, over_vec, E, nb[i]))
        rows = np.concatenate((w, nb))
        d = np.concatenate((w_d, nb_d))
        keep = np.argsort(d, kind="mergesort")[:ef]
        nf = 0
        for i in range(keep.size):
            if keep[i] >= w.size:
                nf += 1
        frontier = np.empty(nf, dtype=np.int64)
        nf = 0
        for i in range(keep.size):
            if keep[i] >= w.size:
                frontier[nf] = rows[keep[i]]
                nf += 1
        w = rows[keep]
        w_d = d[keep]
        if frontier.size == 0:
            break
    order = np.argsort(w_d, kind="mergesort")
    return w[order], w_d[order]


@_compiled
def _new_slot(layer: int, used: np.ndarray) -> int:
    s = used[layer]
    used[layer] = s + 1
    return s


@_compiled
def link(
    layer: int, e: int, new: int, cap: int, base_vec: np.ndarray, over_vec: np.ndarray, E: int, offsets: tuple,
    neighbors: tuple, slot: np.ndarray, adj: tuple, used: np.ndarray,
) -> int:
    """The edge e -> new (``GraphOverlay._link``): appended, or the list pruned by the heuristic when it
    would exceed ``cap``. A base row's first change copies its CSR list into an override row. Returns 1
    when an override row was created."""
    cur = list_of(layer, e, E, offsets, neighbors, slot, adj)
    s = slot[layer, e]
    a = adj[layer]
    n = cur.size
    if n < cap:
        if s < 0:  # written in full before the slot publishes it
            s = _new_slot(layer, used)
            for j in range(n):
                a[s, j] = cur[j]
            a[s, n] = new
            slot[layer, e] = s
            return 1
        a[s, n] = new  # one int32 store: readers see the list with or without it
        return 0
    cand = np.empty(n + 1, dtype=np.int64)
    cand[:n] = cur
    cand[n] = new
    ve = vector_of(base_vec, over_vec, E, e)
    d = np.empty(n + 1, dtype=np.float64)
    for i in range(n + 1):
        d[i] = l2(vector_of(base_vec, over_vec, E, cand[i]), ve)
    kept = heuristic_kernel(cand, d, base_vec, over_vec, E, cap)
    created = 0
    if s < 0:
        s = _new_slot(layer, used)
        created = 1
    for j in range(kept.size):
        a[s, j] = kept[j]
    for j in range(kept.size, a.shape[1]):
        a[s, j] = -1
    slot[layer, e] = s
    return created


@_compiled
def insert_batch(
    rows: np.ndarray, levels: np.ndarray, entry: np.ndarray, max_degree: np.ndarray, M: int, ef_construction: int,
    base_vec: np.ndarray, over_vec: np.ndarray, E: int, offsets: tuple, neighbors: tuple, slot: np.ndarray, adj: tuple,
    used: np.ndarray, stamp: np.ndarray, gen: np.ndarray,
) -> int:
    """HNSW INSERT (Algorithm 1) of the new rows ``rows`` (their vectors already in ``over_vec``), one
    after the other, each searching the graph the ones before it made. Returns override rows created.

    ``gen`` (1,) uint32: the construction search's visited stamp, bumped once per layer search (the
    caller clears ``stamp`` before it could wrap).
    """
    created = 0
    for t in range(rows.size):
        row = rows[t]
        level = levels[t]
        q = over_vec[row - E]
        ep = entry.copy()
        ep_d = np.empty(ep.size, dtype=np.float64)
        for i in range(ep.size):
            ep_d[i] = l2(q, vector_of(base_vec, over_vec, E, ep[i]))
        top = len(offsets) - 1
        for layer in range(top, level, -1):  # greedy descent (ef = 1) above the node's level
            gen[0] += 1
            ep, ep_d = search_layer_l2(q, ep, ep_d, 1, layer, 64, base_vec, over_vec, E, offsets, neighbors,
                                       slot, adj, stamp, gen[0])
        chosen_all = np.full((level + 1, M), -1, dtype=np.int64)
        for layer in range(level, -1, -1):
            gen[0] += 1
            w, w_d = search_layer_l2(q, ep, ep_d, ef_construction, layer, 64, base_vec, over_vec, E, offsets,
                                     neighbors, slot, adj, stamp, gen[0])
            chosen = heuristic_kernel(w, w_d, base_vec, over_vec, E, M)
            a = adj[layer]
            s = _new_slot(layer, used)  # the new node's own list, complete before its slot is set
            for j in range(chosen.size):
                a[s, j] = chosen[j]
                chosen_all[layer, j] = chosen[j]
            slot[layer, row] = s
            ep, ep_d = w, w_d
        for layer in range(level, -1, -1):  # the node is complete: edges to it may now be published
            for j in range(M):
                e = chosen_all[layer, j]
                if e < 0:
                    break
                created += link(layer, e, row, max_degree[layer], base_vec, over_vec, E, offsets, neighbors,
                                slot, adj, used)
    return created
