"""HNSW INSERT into the live overlay, compiled with numba (``service.overlay`` calls these).

The same algorithm as ``GraphOverlay``'s reference (``native=False``), step for step: Malkov &
Yashunin's Algorithm 1 (greedy descent with ef = 1 above the new node's level, then per layer a search
of the current graph with ``ef_construction`` candidates), Algorithm 2 (SEARCH-LAYER: two heaps, ties by
the smaller row) and Algorithm 4 (the neighbour heuristic, hnswlib's ``getNeighborsByHeuristic2``), so
both give the same graph: tested on seeded cases (``tests/service/test_overlay.py``).

Why compiled: in numpy an insertion is ~100 array calls of a few microseconds each from Python (~3 ms
of CPU), and holding the GIL all along, it stalled the serving threads' Python. Here one call inserts a
whole change's entities, O(visited) work and no temporaries beyond small per-step arrays, with the GIL
released (``nogil``), so the scoring threads run beside it.

Distances are squared L2 in float32 over eight interleaved partial sums (``l2_at``), the exact order
``overlay.l2_rows`` computes in numpy: the two agree to the last bit, so a tie in the reference is a tie
here, and no fast-math flag makes the result depend on the CPU's vector width.

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
def l2_at(A: np.ndarray, i: int, B: np.ndarray, k: int) -> np.float32:
    """Squared L2 of rows A[i] and B[k] (float32 matrices): float32, eight interleaved partial sums
    (dimension j into sum j mod 8, each in order), then ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)).
    Written out so that no fast-math reassociation is needed for speed: the result is the same on every
    CPU and equals ``overlay.l2_rows`` (numpy) to the last bit, which keeps workers' graphs and the
    reference identical. Rows by index, not views: no reference counting per distance."""
    s0 = np.float32(0.0)
    s1 = np.float32(0.0)
    s2 = np.float32(0.0)
    s3 = np.float32(0.0)
    s4 = np.float32(0.0)
    s5 = np.float32(0.0)
    s6 = np.float32(0.0)
    s7 = np.float32(0.0)
    d = A.shape[1]
    j = 0
    while j + 8 <= d:
        t0 = A[i, j] - B[k, j]
        t1 = A[i, j + 1] - B[k, j + 1]
        t2 = A[i, j + 2] - B[k, j + 2]
        t3 = A[i, j + 3] - B[k, j + 3]
        t4 = A[i, j + 4] - B[k, j + 4]
        t5 = A[i, j + 5] - B[k, j + 5]
        t6 = A[i, j + 6] - B[k, j + 6]
        t7 = A[i, j + 7] - B[k, j + 7]
        s0 += t0 * t0
        s1 += t1 * t1
        s2 += t2 * t2
        s3 += t3 * t3
        s4 += t4 * t4
        s5 += t5 * t5
        s6 += t6 * t6
        s7 += t7 * t7
        j += 8
    r = d - j  # the tail: dimension j + k into partial sum k
    if r > 0:
        t = A[i, j] - B[k, j]
        s0 += t * t
    if r > 1:
        t = A[i, j + 1] - B[k, j + 1]
        s1 += t * t
    if r > 2:
        t = A[i, j + 2] - B[k, j + 2]
        s2 += t * t
    if r > 3:
        t = A[i, j + 3] - B[k, j + 3]
        s3 += t * t
    if r > 4:
        t = A[i, j + 4] - B[k, j + 4]
        s4 += t * t
    if r > 5:
        t = A[i, j + 5] - B[k, j + 5]
        s5 += t * t
    if r > 6:
        t = A[i, j + 6] - B[k, j + 6]
        s6 += t * t
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@_compiled
def dist_rows(base_vec: np.ndarray, over_vec: np.ndarray, E: int, r1: int, r2: int) -> float:
    """Squared L2 between rows r1 and r2 of base + overlay (``l2_at``), float64."""
    if r1 < E:
        if r2 < E:
            return np.float64(l2_at(base_vec, r1, base_vec, r2))
        return np.float64(l2_at(base_vec, r1, over_vec, r2 - E))
    if r2 < E:
        return np.float64(l2_at(over_vec, r1 - E, base_vec, r2))
    return np.float64(l2_at(over_vec, r1 - E, over_vec, r2 - E))


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
        good = True
        for jj in range(k):
            if dist_rows(base_vec, over_vec, E, rows[i], kept[jj]) < dist[i]:
                good = False
                break
        if good:
            kept[k] = rows[i]
            k += 1
            if k == m:
                break
    return kept[:k]


@_compiled
def _before(d1: float, r1: int, d2: float, r2: int) -> bool:
    """(d1, r1) < (d2, r2): distance, then the smaller row. The one order of both heaps, so the search
    is a function of the graph and the query alone."""
    return d1 < d2 or (d1 == d2 and r1 < r2)


@_compiled
def _heap_push(hd: np.ndarray, hr: np.ndarray, n: int, d: float, r: int, top_is_max: bool) -> None:
    """Push (d, r) into the binary heap hd[:n], hr[:n] (room for one more); min- or max-heap."""
    i = n
    hd[i] = d
    hr[i] = r
    while i > 0:
        p = (i - 1) // 2
        if top_is_max:
            up = _before(hd[p], hr[p], hd[i], hr[i])
        else:
            up = _before(hd[i], hr[i], hd[p], hr[p])
        if not up:
            break
        hd[i], hd[p] = hd[p], hd[i]
        hr[i], hr[p] = hr[p], hr[i]
        i = p


@_compiled
def _heap_pop(hd: np.ndarray, hr: np.ndarray, n: int, top_is_max: bool) -> None:
    """Remove the top of the heap hd[:n], hr[:n] (n >= 1); the caller reads it first."""
    n -= 1
    hd[0] = hd[n]
    hr[0] = hr[n]
    i = 0
    while True:
        best = i
        for c in (2 * i + 1, 2 * i + 2):
            if c < n:
                if top_is_max:
                    better = _before(hd[best], hr[best], hd[c], hr[c])
                else:
                    better = _before(hd[c], hr[c], hd[best], hr[best])
                if better:
                    best = c
        if best == i:
            break
        hd[i], hd[best] = hd[best], hd[i]
        hr[i], hr[best] = hr[best], hr[i]
        i = best


@_compiled
def search_layer_l2(
    qrow: int, ep: np.ndarray, ep_d: np.ndarray, ef: int, layer: int,
    base_vec: np.ndarray, over_vec: np.ndarray, E: int, offsets: tuple, neighbors: tuple, slot: np.ndarray,
    adj: tuple, stamp: np.ndarray, gen: np.uint32, sink: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """HNSW's SEARCH-LAYER (Malkov & Yashunin, Algorithm 2) in L2 around row ``qrow`` (the node being
    inserted, its vector stored), as ``GraphOverlay._search_layer``:
    candidates C a min-heap, results W a max-heap of at most ``ef``; pop the nearest candidate, stop
    when it is farther than W's farthest, else every unvisited neighbour closer than W's farthest (or
    any while W is not full) enters both. Ties by the smaller row. Returns W nearest first."""
    cap = max(64, 4 * ef + ep.size)
    cd = np.empty(cap, dtype=np.float64)
    cr = np.empty(cap, dtype=np.int64)
    nc = 0
    wd = np.empty(ef + 1, dtype=np.float64)
    wr = np.empty(ef + 1, dtype=np.int64)
    nw = 0
    for i in range(ep.size):
        stamp[ep[i]] = gen
        if nc + 1 > cd.size:
            cd = np.concatenate((cd, np.empty(cd.size, dtype=np.float64)))
            cr = np.concatenate((cr, np.empty(cr.size, dtype=np.int64)))
        _heap_push(cd, cr, nc, ep_d[i], ep[i], False)
        nc += 1
        _heap_push(wd, wr, nw, ep_d[i], ep[i], True)
        nw += 1
        if nw > ef:
            _heap_pop(wd, wr, nw, True)
            nw -= 1
    off = offsets[layer]
    nbs = neighbors[layer]
    a = adj[layer]
    dim = base_vec.shape[1]
    todo = np.empty(2 * a.shape[1] + 8, dtype=np.int64)
    touch = np.float32(0.0)
    while nc > 0:
        c_d = cd[0]
        c = cr[0]
        _heap_pop(cd, cr, nc, False)
        nc -= 1
        if _before(wd[0], wr[0], c_d, c):  # the nearest candidate is farther than W's farthest
            break
        s = slot[layer, c]
        if s >= 0:
            lo = 0
            hi = a.shape[1]
        elif c < E:
            lo = off[c]
            hi = off[c + 1]
        else:
            lo = 0
            hi = 0
        # Two passes over the list: first the unvisited neighbours, touching each one's vector (one load
        # per cache line, independent of each other, so the misses overlap like a prefetch), then the
        # distances and heap updates on vectors now in cache.
        if hi - lo > todo.size:
            todo = np.empty(hi - lo, dtype=np.int64)
        m = 0
        for j in range(lo, hi):
            e = np.int64(a[s, j]) if s >= 0 else np.int64(nbs[j])
            if e < 0 or stamp[e] == gen:
                continue
            stamp[e] = gen
            todo[m] = e
            m += 1
            if e < E:
                for k in range(0, dim, 16):
                    touch += base_vec[e, k]
            else:
                for k in range(0, dim, 16):
                    touch += over_vec[e - E, k]
        for t in range(m):
            e = todo[t]
            d = dist_rows(base_vec, over_vec, E, qrow, e)
            if nw < ef or _before(d, e, wd[0], wr[0]):
                if nc + 1 > cd.size:
                    cd = np.concatenate((cd, np.empty(cd.size, dtype=np.float64)))
                    cr = np.concatenate((cr, np.empty(cr.size, dtype=np.int64)))
                _heap_push(cd, cr, nc, d, e, False)
                nc += 1
                _heap_push(wd, wr, nw, d, e, True)
                nw += 1
                if nw > ef:
                    _heap_pop(wd, wr, nw, True)
                    nw -= 1
    sink[0] += touch  # keeps the touching loads from being optimised away
    w = wr[:nw].copy()
    w_d = wd[:nw].copy()
    by_row = np.argsort(w, kind="mergesort")
    w, w_d = w[by_row], w_d[by_row]
    by_d = np.argsort(w_d, kind="mergesort")  # stable: equal distances stay in row order
    return w[by_d], w_d[by_d]


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
    d = np.empty(n + 1, dtype=np.float64)
    for i in range(n + 1):
        d[i] = dist_rows(base_vec, over_vec, E, cand[i], e)
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
    used: np.ndarray, stamp: np.ndarray, gen: np.ndarray, sink: np.ndarray,
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
        ep = entry.copy()
        ep_d = np.empty(ep.size, dtype=np.float64)
        for i in range(ep.size):
            ep_d[i] = dist_rows(base_vec, over_vec, E, row, ep[i])
        top = len(offsets) - 1
        for layer in range(top, level, -1):  # greedy descent (ef = 1) above the node's level
            gen[0] += 1
            ep, ep_d = search_layer_l2(row, ep, ep_d, 1, layer, base_vec, over_vec, E, offsets, neighbors,
                                       slot, adj, stamp, gen[0], sink)
        chosen_all = np.full((level + 1, M), -1, dtype=np.int64)
        for layer in range(level, -1, -1):
            gen[0] += 1
            w, w_d = search_layer_l2(row, ep, ep_d, ef_construction, layer, base_vec, over_vec, E, offsets,
                                     neighbors, slot, adj, stamp, gen[0], sink)
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
