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
def top_by_key(rows: np.ndarray, keys: np.ndarray, n: int) -> np.ndarray:
    """Indices (ascending) of the ``n`` largest keys, ties at the cut broken by the smaller row. O(len)."""
    total = keys.size
    if total <= n:
        return np.arange(total)
    thr = np.partition(keys.copy(), total - n)[total - n]  # the n-th largest key
    above = 0
    for i in range(total):
        if keys[i] > thr:
            above += 1
    need = n - above  # >= 1: that many of the rows tied at thr get in
    tied = np.empty(total - above, dtype=np.int64)
    t = 0
    for i in range(total):
        if keys[i] == thr:
            tied[t] = i
            t += 1
    tied = tied[:t]
    take = np.zeros(total, dtype=np.bool_)
    for i in range(total):
        if keys[i] > thr:
            take[i] = True
    if t <= need:
        for i in range(t):
            take[tied[i]] = True
    else:
        order = np.argsort(rows[tied], kind="mergesort")
        for i in range(need):
            take[tied[order[i]]] = True
    return np.flatnonzero(take)


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
def best_first_kernel(rows: np.ndarray, scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``service.search.best_first`` compiled: the ``n`` best of (rows, scores), score descending, ties by
    the smaller row. O(len) selection, then a sort of the ``n`` kept."""
    keep = top_by_key(rows, scores.astype(np.float64), n)
    r, s = rows[keep], scores[keep]
    by_row = np.argsort(r, kind="mergesort")
    r, s = r[by_row], s[by_row]
    by_score = np.argsort(-s, kind="mergesort")  # stable: equal scores stay in row order
    return r[by_score], s[by_score]


@_compiled
def merge_kernel(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``service.search.merge`` over the concatenated per-layer lists: a row appears once (a request
    scores a node once, so its score is the same in every layer), then the top-``k`` best first."""
    order = np.argsort(rows, kind="mergesort")
    keep = np.empty(rows.size, dtype=np.int64)
    m = 0
    for i in range(order.size):
        if i == 0 or rows[order[i]] != rows[order[i - 1]]:
            keep[m] = order[i]
            m += 1
    keep = keep[:m]
    return best_first_kernel(rows[keep], scores[keep], k)


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
