"""The beam search's per-step bookkeeping, compiled with numba (``service.search`` calls these).

NANN's SEARCH-LAYER spends each expansion step on three small jobs around ONE model call: gather the
frontier's neighbour lists and drop what this layer has seen, pick the rows not yet scored, and keep
the top-ef of beam + new. In numpy each is a chain of 8-15 array calls of a few microseconds on a few
hundred rows; at ~10 steps per query those calls were 17-21% of a 1M-catalogue query (the time outside
onnxruntime). Here each job is one compiled loop over the rows it touches: no temporary arrays beyond
its output, O(rows) work, and ``nogil`` so that concurrent request threads run them in parallel.

The beam's top-ef is deterministic: key descending, ties broken by the smaller row (the module's
"best first" convention), so the answer of a search is a function of the scores alone, whatever order
the rows were produced in. The batched lockstep search (``service.lockstep``) relies on that to give
the same answers as one request at a time.

Compiled on first use (a few seconds; ``MatchEngine.warmup`` does it before traffic) and cached on disk
next to this module where that is writable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit

# A node that may never be returned ranks below every returnable one in a filtered beam (paper IV-B's
# beam with hnswlib-style filtering); float64 keys, so the offset never swallows score differences.
NOT_PREFERRED_OFFSET = 1e9


def _compiled(fn: Callable[..., Any]) -> Any:
    """``njit`` with the on-disk cache where there is somewhere to write it (next to this module, or the
    user's cache directory); numba refuses ``cache=True`` outright where neither is writable (a read-only
    image without a home directory), and then each process compiles at start-up."""
    try:
        return njit(cache=True, nogil=True)(fn)
    except RuntimeError:
        return njit(cache=False, nogil=True)(fn)


@_compiled
def mark_unseen(rows: np.ndarray, seen: np.ndarray, stamp: np.uint32) -> np.ndarray:
    """Rows not yet seen in this layer, de-duplicated (first occurrence order kept), now marked seen."""
    out = np.empty(rows.size, dtype=np.int64)
    m = 0
    for i in range(rows.size):
        r = rows[i]
        if seen[r] != stamp:
            seen[r] = stamp
            out[m] = r
            m += 1
    return out[:m]


@_compiled
def expand_unseen(
    offsets: np.ndarray, neighbors: np.ndarray, frontier: np.ndarray, max_degree: int, seen: np.ndarray, stamp: np.uint32,
    slot: np.ndarray, adj: np.ndarray,
) -> np.ndarray:
    """``mark_unseen(expand(frontier))`` in one pass: the frontier's neighbour lists (first ``max_degree``
    of each when > 0), minus the layer's seen set, in frontier then adjacency order.

    Lists are the CSR arrays', except where a live overlay (``service.overlay``) holds the row's list:
    ``slot`` (E + capacity,) int32 the row's slot in ``adj`` (slots, cap) int32 (-1 padded), -1 = the
    CSR list (base rows) or none (overlay rows); an empty ``slot`` = a plain graph. A slot beyond the
    ``adj`` given (the writer grew it since) reads as unset, and -1 entries are skipped (an append
    racing this read), so a concurrent insertion only ever shows an older list.
    """
    live = slot.size > 0
    num_base = offsets.size - 1
    width = adj.shape[1]
    n_slots = adj.shape[0]
    total = 0
    for i in range(frontier.size):
        f = frontier[i]
        s = slot[f] if live else -1
        if s >= 0 and s < n_slots:
            n = width
        elif f < num_base:
            n = offsets[f + 1] - offsets[f]
        else:
            n = 0
        if max_degree > 0 and n > max_degree:
            n = max_degree
        total += n
    out = np.empty(total, dtype=np.int64)
    m = 0
    for i in range(frontier.size):
        f = frontier[i]
        s = slot[f] if live else -1
        if s >= 0 and s < n_slots:
            n = width
            if max_degree > 0 and n > max_degree:
                n = max_degree
            for j in range(n):
                r = np.int64(adj[s, j])
                if r >= 0 and seen[r] != stamp:
                    seen[r] = stamp
                    out[m] = r
                    m += 1
            continue
        if f >= num_base:
            continue
        start = offsets[f]
        n = offsets[f + 1] - start
        if max_degree > 0 and n > max_degree:
            n = max_degree
        for j in range(start, start + n):
            r = np.int64(neighbors[j])
            if seen[r] != stamp:
                seen[r] = stamp
                out[m] = r
                m += 1
    return out[:m]


NO_OVERLAY_SLOTS = np.empty(0, dtype=np.int32)  # ``expand_unseen``'s plain-graph arguments
NO_OVERLAY_ADJ = np.empty((0, 1), dtype=np.int32)


@_compiled
def take_fresh(rows: np.ndarray, scored: np.ndarray, req: np.uint32) -> np.ndarray:
    """The rows (unique) this request has not scored yet, now marked scored: a node is scored once per
    request, whichever layer reaches it again."""
    out = np.empty(rows.size, dtype=np.int64)
    m = 0
    for i in range(rows.size):
        r = rows[i]
        if scored[r] != req:
            scored[r] = req
            out[m] = r
            m += 1
    return out[:m]


@_compiled
def store_lookup(rows: np.ndarray, fresh: np.ndarray, fresh_scores: np.ndarray, cache: np.ndarray) -> np.ndarray:
    """Write the fresh rows' scores into the request's score cache, then read the scores of ``rows``."""
    for i in range(fresh.size):
        cache[fresh[i]] = fresh_scores[i]
    out = np.empty(rows.size, dtype=np.float32)
    for i in range(rows.size):
        out[i] = cache[rows[i]]
    return out


@_compiled
def rank_keys(scores: np.ndarray, preferred: np.ndarray, use_preferred: bool) -> np.ndarray:
    """The beam's ranking key: the score, minus ``NOT_PREFERRED_OFFSET`` for rows the request can never
    return when the beam is filtered (``search_layer(prefer=...)``)."""
    out = np.empty(scores.size, dtype=np.float64)
    for i in range(scores.size):
        out[i] = np.float64(scores[i])
        if use_preferred and not preferred[i]:
            out[i] -= NOT_PREFERRED_OFFSET
    return out


@_compiled
def kth_largest(keys: np.ndarray, kth: int) -> float:
    """The ``kth`` largest of ``keys`` (1 <= kth <= keys.size), O(len): quickselect on a copy.

    numba's ``np.partition`` pivots on the last element, which is slow on the beam's keys (the old
    beam's top-ef come first, then the new rows: a partly ordered array); median-of-three pivots here,
    and a sort of what is left should a bad input ever need more than 64 rounds.
    """
    a = keys.copy()
    lo = 0
    hi = a.size - 1
    target = a.size - kth  # its index in ascending order
    rounds = 0
    while hi > lo:
        rounds += 1
        if rounds > 64:
            part = np.sort(a[lo : hi + 1])
            return part[target - lo]
        mid = (lo + hi) >> 1
        x, y, z = a[lo], a[mid], a[hi]
        if x > y:
            x, y = y, x
        if y > z:
            y = z
        if x > y:
            y = x
        pivot = y
        i = lo
        j = hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                t = a[i]
                a[i] = a[j]
                a[j] = t
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            return a[target]
    return a[target]


@_compiled
def top_by_key(rows: np.ndarray, keys: np.ndarray, n: int) -> np.ndarray:
    """Indices (ascending) of the ``n`` largest keys, ties at the cut broken by the smaller row. O(len)."""
    total = keys.size
    if total <= n:
        return np.arange(total)
    thr = kth_largest(keys, n)
    above = 0
    tied_count = 0
    for i in range(total):
        if keys[i] > thr:
            above += 1
        elif keys[i] == thr:
            tied_count += 1
    need = n - above  # >= 1: that many of the rows tied at thr get in
    out = np.empty(n, dtype=np.int64)
    if tied_count <= need:  # every tied row gets in (the usual case: float scores rarely tie)
        m = 0
        for i in range(total):
            if keys[i] >= thr:
                out[m] = i
                m += 1
        return out
    tied = np.empty(tied_count, dtype=np.int64)
    t = 0
    for i in range(total):
        if keys[i] == thr:
            tied[t] = i
            t += 1
    order = np.argsort(rows[tied], kind="mergesort")
    take = np.zeros(total, dtype=np.bool_)
    for i in range(need):
        take[tied[order[i]]] = True
    m = 0
    for i in range(total):
        if keys[i] > thr or take[i]:
            out[m] = i
            m += 1
    return out


@_compiled
def beam_update(
    w_rows: np.ndarray,
    w_scores: np.ndarray,
    w_keys: np.ndarray,
    n_rows: np.ndarray,
    n_scores: np.ndarray,
    n_keys: np.ndarray,
    ef: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """NANN's W <- top-ef(W u N) and C <- W n N: returns (W rows, W scores, W keys, C rows)."""
    nw = w_rows.size
    if nw >= ef and nw > 0:
        # A full beam: only new rows keyed at least as high as its worst can enter (ties at the worst
        # too, they may win on the row). Selecting over W and those alone gives the same top-ef; late in
        # a layer few new rows pass, so the selection is over ~ef keys instead of ef + |N|.
        floor = w_keys.min()
        passing = np.flatnonzero(n_keys >= floor)
        if passing.size == 0:
            return w_rows, w_scores, w_keys, np.empty(0, dtype=np.int64)
        n_rows, n_scores, n_keys = n_rows[passing], n_scores[passing], n_keys[passing]
    rows = np.concatenate((w_rows, n_rows))
    scores = np.concatenate((w_scores, n_scores))
    keys = np.concatenate((w_keys, n_keys))
    keep = top_by_key(rows, keys, ef)
    m = 0
    for i in range(keep.size):
        if keep[i] >= nw:
            m += 1
    frontier = np.empty(m, dtype=np.int64)
    j = 0
    for i in range(keep.size):
        if keep[i] >= nw:
            frontier[j] = rows[keep[i]]
            j += 1
    return rows[keep], scores[keep], keys[keep], frontier


@_compiled
def advance(
    pending: np.ndarray,
    fresh: np.ndarray,
    fresh_scores: np.ndarray,
    preferred: np.ndarray,
    use_preferred: bool,
    cache: np.ndarray,
    w_rows: np.ndarray,
    w_scores: np.ndarray,
    w_keys: np.ndarray,
    ef: int,
    expand: bool,
    offsets: np.ndarray,
    neighbors: np.ndarray,
    max_degree: int,
    seen: np.ndarray,
    layer_stamp: np.uint32,
    scored: np.ndarray,
    req: np.uint32,
    slot: np.ndarray,
    adj: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]:
    """One expansion step's bookkeeping in one call, so that a step costs one compiled call around the
    model call instead of five: the scores of ``pending`` (``fresh`` ones just scored, the rest from the
    cache) update the beam (W <- top-ef(W u N), C <- W n N); then, if ``expand`` and C is not empty,
    C is expanded (N' = neighbours - S, over the live overlay's lists where ``slot`` / ``adj`` give one,
    see ``expand_unseen``) and the rows of N' never scored by this request are picked.

    Returns (pending scores, W rows, W scores, W keys, |C|, N' rows, N' rows to score).
    """
    scores = store_lookup(pending, fresh, fresh_scores, cache)
    keys = rank_keys(scores, preferred, use_preferred)
    w_rows, w_scores, w_keys, frontier = beam_update(w_rows, w_scores, w_keys, pending, scores, keys, ef)
    if expand and frontier.size > 0:
        nxt = expand_unseen(offsets, neighbors, frontier, max_degree, seen, layer_stamp, slot, adj)
        nxt_fresh = take_fresh(nxt, scored, req)
    else:
        nxt = np.empty(0, dtype=np.int64)
        nxt_fresh = nxt
    return scores, w_rows, w_scores, w_keys, frontier.size, nxt, nxt_fresh


@_compiled
def order_keys(rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """"Best first" as one uint64 per row, ascending = score descending, then row ascending: the score's
    bits mapped to an unsigned order (-0.0 counted as 0.0, as a float comparison does) in the high half,
    the row (< 2**32) in the low half. One sort of these replaces a stable sort by row, then by score."""
    sc = scores.copy()
    for i in range(sc.size):
        if sc[i] == 0:
            sc[i] = 0.0
    bits = sc.view(np.uint32)
    out = np.empty(rows.size, dtype=np.uint64)
    sign = np.uint64(0x80000000)
    low = np.uint64(0xFFFFFFFF)
    for i in range(rows.size):
        b = np.uint64(bits[i])
        b = (~b & low) if b & sign else (b | sign)  # ascending unsigned = ascending float
        out[i] = ((low - b) << np.uint64(32)) | np.uint64(rows[i])
    return out


@_compiled
def best_first_kernel(rows: np.ndarray, scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``service.search.best_first`` compiled: the ``n`` best of (rows, scores), score descending, ties by
    the smaller row. O(len) selection, then one sort of the ``n`` kept."""
    keep = top_by_key(rows, scores.astype(np.float64), n)
    r, s = rows[keep], scores[keep]
    order = np.argsort(order_keys(r, s))
    return r[order], s[order]


@_compiled
def merge_kernel(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``service.search.merge`` over the concatenated per-layer lists: a row appears once (a request
    scores a node once, so its score is the same in every layer: its repeats sort next to each other),
    then the top-``k`` best first."""
    keys = order_keys(rows, scores)
    order = np.argsort(keys)
    out_r = np.empty(min(k, rows.size), dtype=np.int64)
    out_s = np.empty(min(k, rows.size), dtype=np.float32)
    m = 0
    for i in range(order.size):
        if m == out_r.size:
            break
        j = order[i]
        if i > 0 and keys[j] == keys[order[i - 1]]:
            continue
        out_r[m] = rows[j]
        out_s[m] = scores[j]
        m += 1
    return out_r[:m], out_s[:m]


@_compiled
def keep_rows(
    rows: np.ndarray, mask: np.ndarray, bit: np.uint64, etype: np.ndarray, type_ok: np.ndarray, excluded: np.ndarray
) -> np.ndarray:
    """Which rows a request may return: in its domain (``mask & bit``), of an allowed entity type
    (``type_ok[etype]``; empty = any type), not excluded (``excluded`` sorted; empty = none)."""
    out = np.empty(rows.size, dtype=np.bool_)
    check_type = type_ok.size > 0
    check_excl = excluded.size > 0
    for i in range(rows.size):
        r = rows[i]
        ok = (mask[r] & bit) != 0
        if ok and check_type:
            ok = type_ok[etype[r]]
        if ok and check_excl:
            j = np.searchsorted(excluded, r)
            ok = not (j < excluded.size and excluded[j] == r)
        out[i] = ok
    return out


# ---- the fused request loop: one compiled call per model call ------------------------------------------
# ``service.search.FusedBeam`` keeps a request's whole search state in preallocated arrays and calls
# ``fused_step`` once per model call: the step consumes the scores of the rows it handed out last time,
# updates the beam, expands, and when a layer is done takes its top-n into the results and starts the
# next layer, all without returning to Python. Slots of the ``st`` state array:
ST_LAYER = 0  # index into the layers, top first
ST_T = 1  # expansion steps taken in this layer
ST_NW = 2  # beam size |W|
ST_NP = 3  # rows handed out last (pending: their scores come in with the next call)
ST_NF = 4  # of which never scored by this request (the rows the caller scores)
ST_NS = 5  # nodes seen in this layer (S)
ST_NR = 6  # results collected for the final merge
ST_PARTIAL = 7  # the deadline stopped a layer early
ST_PREFER = 8  # this layer's beam ranks returnable rows first (filtered bottom layer)
ST_STAMP = 9  # the first layer's seen-stamp; layer i uses ST_STAMP + i
ST_REQ = 10  # this request's scored-stamp
ST_USE_KEEP = 11  # a returnable-row filter is given
ST_FILTER_BEAM = 12
ST_SIZE = 13
# Rows of the per-layer ``lay`` array (one column per layer, top first):
LAY_EF, LAY_STEPS, LAY_TOP_N, LAY_DEGREE, LAY_OUT_STEPS, LAY_OUT_SEEN = range(6)


@_compiled
def keep_into(
    rows: np.ndarray, out: np.ndarray, mask: np.ndarray, bit: np.uint64, etype: np.ndarray, type_ok: np.ndarray,
    excluded: np.ndarray, live: np.ndarray,
) -> None:
    """``keep_rows`` (and the live catalogue's ``live`` flags when given) written into ``out[:rows.size]``."""
    check_type = type_ok.size > 0
    check_excl = excluded.size > 0
    check_live = live.size > 0
    for i in range(rows.size):
        r = rows[i]
        ok = (mask[r] & bit) != 0
        if ok and check_type:
            ok = type_ok[etype[r]]
        if ok and check_excl:
            j = np.searchsorted(excluded, r)
            ok = not (j < excluded.size and excluded[j] == r)
        if check_live:
            ok = ok and live[r]
        out[i] = ok


@_compiled
def _hand_out(
    st: np.ndarray, rows: np.ndarray, ib: tuple, bb: tuple, scored: np.ndarray,
    mask: np.ndarray, bit: np.uint64, etype: np.ndarray, type_ok: np.ndarray, excluded: np.ndarray, live: np.ndarray,
) -> int:
    """``rows`` (unique, unseen in this layer) become the pending rows; returns how many need a score."""
    pending, fresh, ok = ib[1], ib[2], bb[0]
    n = rows.size
    pending[:n] = rows
    req = np.uint32(st[ST_REQ])
    m = 0
    for i in range(n):
        r = rows[i]
        if scored[r] != req:
            scored[r] = req
            fresh[m] = r
            m += 1
    if st[ST_PREFER] and n:
        keep_into(rows, ok, mask, bit, etype, type_ok, excluded, live)
    st[ST_NP] = n
    st[ST_NF] = m
    return m


@_compiled
def _expand_hand_out(
    st: np.ndarray, frontier: np.ndarray, offsets: np.ndarray, neighbors: np.ndarray, max_degree: int,
    seen: np.ndarray, stamp: np.uint32, slot: np.ndarray, adj: np.ndarray, ib: tuple, bb: tuple, scored: np.ndarray,
    mask: np.ndarray, bit: np.uint64, etype: np.ndarray, type_ok: np.ndarray, excluded: np.ndarray, live: np.ndarray,
) -> int:
    """``_hand_out(expand_unseen(...))`` in one pass, straight into the pending and fresh buffers: the same
    rows in the same order (frontier, then adjacency order), each checked against S and then against the
    request's scored set while its line is in cache. Returns how many need a score (pending: ``st[ST_NP]``)."""
    pending, fresh, ok = ib[1], ib[2], bb[0]
    cap = pending.size
    has_slots = slot.size > 0
    num_base = offsets.size - 1
    width = adj.shape[1]
    n_slots = adj.shape[0]
    req = np.uint32(st[ST_REQ])
    n = 0
    m = 0
    for i in range(frontier.size):
        f = frontier[i]
        s = slot[f] if has_slots else -1
        if s >= 0 and s < n_slots:
            cnt = width
            if max_degree > 0 and cnt > max_degree:
                cnt = max_degree
            for j in range(cnt):
                r = np.int64(adj[s, j])
                if r >= 0 and seen[r] != stamp:
                    seen[r] = stamp
                    if n == cap:
                        raise ValueError("fused search: pending buffer too small")
                    pending[n] = r
                    n += 1
                    if scored[r] != req:
                        scored[r] = req
                        fresh[m] = r
                        m += 1
            continue
        if f >= num_base:
            continue
        start = offsets[f]
        cnt = offsets[f + 1] - start
        if max_degree > 0 and cnt > max_degree:
            cnt = max_degree
        for j in range(start, start + cnt):
            r = np.int64(neighbors[j])
            if seen[r] != stamp:
                seen[r] = stamp
                if n == cap:
                    raise ValueError("fused search: pending buffer too small")
                pending[n] = r
                n += 1
                if scored[r] != req:
                    scored[r] = req
                    fresh[m] = r
                    m += 1
    if st[ST_PREFER] and n:
        keep_into(pending[:n], ok, mask, bit, etype, type_ok, excluded, live)
    st[ST_NP] = n
    st[ST_NF] = m
    return m


@_compiled
def _start_layer(
    st: np.ndarray, lay: np.ndarray, ep: np.ndarray, seeds: np.ndarray, ib: tuple, bb: tuple, seen: np.ndarray,
    scored: np.ndarray, mask: np.ndarray, bit: np.uint64, etype: np.ndarray, type_ok: np.ndarray,
    excluded: np.ndarray, live: np.ndarray,
) -> int:
    """``RequestBeam.next_layer`` + ``start_layer``: the entry set ``ep`` (+ the seeds at the bottom)."""
    i = st[ST_LAYER]
    num_layers = lay.shape[1]
    st[ST_T] = 0
    st[ST_NW] = 0
    st[ST_NS] = 0
    st[ST_PREFER] = 1 if (st[ST_USE_KEEP] and st[ST_FILTER_BEAM] and i == num_layers - 1) else 0
    if i == num_layers - 1 and seeds.size:
        ep = np.concatenate((ep, seeds))
    rows = mark_unseen(ep, seen, np.uint32(st[ST_STAMP] + i))
    return _hand_out(st, rows, ib, bb, scored, mask, bit, etype, type_ok, excluded, live)


@_compiled
def fused_begin(
    st: np.ndarray, lay: np.ndarray, ep: np.ndarray, seeds: np.ndarray, ib: tuple, bb: tuple, seen: np.ndarray,
    scored: np.ndarray, mask: np.ndarray, bit: np.uint64, etype: np.ndarray, type_ok: np.ndarray,
    excluded: np.ndarray, live: np.ndarray,
) -> int:
    """The request's first call: the top layer's entry rows; returns how many need a score."""
    st[ST_LAYER] = 0
    st[ST_NR] = 0
    st[ST_PARTIAL] = 0
    return _start_layer(st, lay, ep, seeds, ib, bb, seen, scored, mask, bit, etype, type_ok, excluded, live)


@_compiled
def fused_step(
    st: np.ndarray,
    lay: np.ndarray,
    fresh_scores: np.ndarray,
    past: bool,
    seeds: np.ndarray,
    ib: tuple,
    fb: tuple,
    w_keys: np.ndarray,
    bb: tuple,
    seen: np.ndarray,
    scored: np.ndarray,
    cache: np.ndarray,
    offsets: np.ndarray,
    neighbors: np.ndarray,
    slot: np.ndarray,
    adj: np.ndarray,
    mask: np.ndarray,
    bit: np.uint64,
    etype: np.ndarray,
    type_ok: np.ndarray,
    excluded: np.ndarray,
    live: np.ndarray,
) -> int:
    """``RequestBeam.advance`` (+ ``end_layer`` and the next ``start_layer`` when a layer is done) in one
    call: the scores of the fresh rows handed out last; returns how many rows the caller scores next
    (their rows: ``ib[2][:n]``), or -1 when the search is over (results in ``ib[4]`` / ``fb[2]``).

    Buffers: ``ib`` = (W rows, pending, fresh, seen rows, result rows) int64, ``fb`` = (W scores, seen
    scores, result scores) float32, ``bb`` = (pending returnable, seen returnable) bool, sized by
    ``service.search.fused_search`` for the request's worst case. ``offsets`` / ``neighbors`` (CSR) and
    ``slot`` / ``adj`` (the live overlay's lists): the current layer's.
    """
    w_rows_b, pending_b, fresh_b, s_rows_b, r_rows_b = ib
    w_scores_b, s_scores_b, r_scores_b = fb
    ok_b, s_ok_b = bb
    i = st[ST_LAYER]
    num_layers = lay.shape[1]
    prefer = st[ST_PREFER] != 0
    npend = st[ST_NP]
    pending = pending_b[:npend]
    fresh = fresh_b[: st[ST_NF]]
    ok = ok_b[:npend]
    ns = st[ST_NS]
    if ns + npend > s_rows_b.size:
        raise ValueError("fused search: seen buffer too small")
    for j in range(fresh.size):  # the score cache, then the pending rows' scores straight into S
        cache[fresh[j]] = fresh_scores[j]
    scores = s_scores_b[ns : ns + npend]
    keys = np.empty(npend, dtype=np.float64)
    for j in range(npend):
        sc = cache[pending[j]]
        scores[j] = sc
        keys[j] = np.float64(sc)
        if prefer and not ok[j]:
            keys[j] -= NOT_PREFERRED_OFFSET
    s_rows_b[ns : ns + npend] = pending
    if prefer:
        s_ok_b[ns : ns + npend] = ok
    ns += npend
    st[ST_NS] = ns
    nw = st[ST_NW]
    w_rows, w_scores, w_keys_new, frontier = beam_update(
        w_rows_b[:nw], w_scores_b[:nw], w_keys[:nw], pending, scores, keys, lay[LAY_EF, i]
    )
    nw = w_rows.size
    w_rows_b[:nw] = w_rows
    w_scores_b[:nw] = w_scores
    w_keys[:nw] = w_keys_new
    st[ST_NW] = nw
    t = st[ST_T]
    expand = t < lay[LAY_STEPS, i] and not past
    if frontier.size > 0:
        if not expand:
            if past and t < lay[LAY_STEPS, i]:
                st[ST_PARTIAL] = 1
        else:
            st[ST_T] = t + 1
            lay[LAY_OUT_STEPS, i] += 1
            m = _expand_hand_out(
                st, frontier, offsets, neighbors, lay[LAY_DEGREE, i], seen, np.uint32(st[ST_STAMP] + i), slot, adj,
                ib, bb, scored, mask, bit, etype, type_ok, excluded, live,
            )
            if st[ST_NP]:
                return m
    # The layer is done: its top-n of the returnable nodes it saw join the results; W enters the next.
    lay[LAY_OUT_SEEN, i] = ns
    s_rows = s_rows_b[:ns]
    s_scores = s_scores_b[:ns]
    if st[ST_USE_KEEP] and ns:
        s_ok = s_ok_b[:ns]
        if not prefer:
            keep_into(s_rows, s_ok, mask, bit, etype, type_ok, excluded, live)
        s_rows = s_rows[s_ok]
        s_scores = s_scores[s_ok]
    top_n = lay[LAY_TOP_N, i]
    if top_n > 0 and s_rows.size:
        r_rows, r_scores = best_first_kernel(s_rows, s_scores, top_n)
        nr = st[ST_NR]
        r_rows_b[nr : nr + r_rows.size] = r_rows
        r_scores_b[nr : nr + r_rows.size] = r_scores
        st[ST_NR] = nr + r_rows.size
    if st[ST_PARTIAL] or i + 1 >= num_layers:
        return -1
    st[ST_LAYER] = i + 1
    return _start_layer(
        st, lay, w_rows_b[:nw].copy(), seeds, ib, bb, seen, scored, mask, bit, etype, type_ok, excluded, live
    )
