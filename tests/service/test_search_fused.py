"""The fused request loop (``service.search.fused_search``): the compiled loop's answers, byte for byte.

The fused loop replaces the per-step ``RequestBeam`` calls with one compiled call per model call, so the
contract is strict: the same rows handed to the scorer in the same order and batches (a model's score's
last bit depends on the batch), the same rows and scores returned, the same steps and seen counts per
layer, and the same ``partial``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from contracts.bundle import load_bundle
from contracts.graph import Graph
from service.overlay import GraphOverlay
from service.search import KeepRows, LiveGraph, VisitedSet, search
from tests.fixtures.fake_bundle import make_fake_bundle

E = 1500


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory):
    return load_bundle(make_fake_bundle(tmp_path_factory.mktemp("fused") / "b", num_entities=E, dim=16, seed=3))


class Recorder:
    """Inner-product scores; records every batch it is asked (copied: the fused loop reuses its buffer)."""

    def __init__(self, vectors: np.ndarray, query: np.ndarray) -> None:
        self.vectors, self.query = vectors, query
        self.calls: list[np.ndarray] = []

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.calls.append(rows.copy())
        return (self.vectors[rows] @ self.query).astype(np.float32)


def keep_rows(pred, n: int = E, live: np.ndarray | None = None, excluded=(), types=None) -> KeepRows:
    rows = np.arange(n)
    etype = (rows % 3).astype(np.int64)
    type_ok = np.zeros(0, np.bool_)
    if types is not None:
        type_ok = np.zeros(3, np.bool_)
        type_ok[list(types)] = True
    return KeepRows(mask=np.where(pred(rows), 1, 2).astype(np.uint64), bit=np.uint64(1), etype=etype, type_ok=type_ok,
                    excluded=np.asarray(sorted(excluded), dtype=np.int64), live=np.zeros(0, np.bool_) if live is None else live)


def assert_same(graph: Graph, vectors: np.ndarray, total: int, queries: int = 8, seed: int = 11, **kw) -> None:
    kw = {"k": 30, "ef": (16, 32, 64, 128), "steps": (1, 1, 1, 3), "top_n": (0, 0, 50, 50)} | kw
    rng = np.random.default_rng(seed)
    va, vb = VisitedSet(total), VisitedSet(total)  # reused across queries, as a worker thread does
    for _ in range(queries):
        q = rng.normal(size=vectors.shape[1]).astype(np.float32)
        sa, sb = Recorder(vectors, q), Recorder(vectors, q)
        a = search(graph, sa, visited=va, loop="compiled", **kw)
        b = search(graph, sb, visited=vb, loop="fused", **kw)
        assert len(sa.calls) == len(sb.calls)
        for x, y in zip(sa.calls, sb.calls, strict=True):
            np.testing.assert_array_equal(x, y)  # the same batches, in the same order
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.scores, b.scores)
        assert a.scores.dtype == b.scores.dtype == np.float32 and a.rows.dtype == b.rows.dtype
        assert [(s.layer, s.steps, s.seen) for s in a.layers] == [(s.layer, s.steps, s.seen) for s in b.layers]
        assert a.partial == b.partial


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"keep": keep_rows(lambda r: r % 3 != 0), "filter_beam": True},
        {"keep": keep_rows(lambda r: r % 2 == 0)},
        {"keep": keep_rows(lambda r: r >= 0, excluded=range(0, E, 7), types=(0, 2)), "filter_beam": True},
        {"keep": keep_rows(lambda r: r % 2 == 0, live=np.arange(E) % 5 != 0), "filter_beam": True},
        {"keep": keep_rows(lambda r: r < 40), "filter_beam": True},  # few returnable rows: some layers keep none
        {"seeds": np.array([7, 70, 700, 7], dtype=np.int64), "max_degree": (0, 0, 0, 5)},
        {"whole_top_layer_up_to": 0, "ef": (4, 8, 16, 40), "steps": (2, 2, 3, 12), "top_n": (3, 3, 10, 40)},
        {"ef": (64, 64, 256, 600), "steps": (3, 3, 4, 30), "top_n": (64, 64, 256, 600), "k": 500},  # wide: buffers grow
        {"ef": (2, 2, 2, 2), "steps": (0, 0, 0, 0), "top_n": (1, 1, 1, 1), "k": 1},
    ],
)
def test_fused_loop_gives_the_compiled_loops_answers(bundle, kw) -> None:
    assert_same(bundle.graph, np.asarray(bundle.vectors), E, **kw)


def test_fused_loop_walks_a_live_overlay_like_the_compiled_loop(bundle) -> None:
    rng = np.random.default_rng(4)
    base_vectors = np.asarray(bundle.vectors)
    ov = GraphOverlay(bundle.graph, base_vectors, capacity=210, M=8, ef_construction=64, seed=2)
    for v in base_vectors[rng.integers(0, E, 200)] + 0.3 * rng.normal(size=(200, base_vectors.shape[1])):
        ov.insert((v / np.linalg.norm(v)).astype(np.float32))
    graph = LiveGraph(**{f.name: getattr(bundle.graph, f.name) for f in dataclasses.fields(bundle.graph)}, overlay=ov)
    total = ov.E + ov.capacity
    vectors = np.concatenate([base_vectors, ov.vectors_of(np.arange(ov.E, total))])
    keep = keep_rows(lambda r: r % 4 != 1, n=total, live=rng.random(total) < 0.9)
    assert_same(graph, vectors, total, k=20, ef=(8, 8, 16, 48), steps=(1, 2, 3, 8), top_n=(8, 8, 16, 48))
    assert_same(graph, vectors, total, k=20, ef=(8, 8, 16, 48), steps=(1, 2, 3, 8), top_n=(8, 8, 16, 48), keep=keep,
                filter_beam=True, max_degree=(0, 0, 0, 12))


@pytest.mark.parametrize("calls", [1, 2, 4, 7])
def test_a_deadline_stops_both_loops_at_the_same_step(bundle, calls: int) -> None:
    """The deadline passes once ``calls`` model calls were made: both loops stop at the same step."""
    vec = np.asarray(bundle.vectors)
    q = np.random.default_rng(2).normal(size=vec.shape[1]).astype(np.float32)
    kw = {"k": 30, "ef": (16, 32, 64, 128), "steps": (1, 1, 2, 6), "top_n": (8, 8, 50, 50), "deadline": 5.0}
    sa, sb = Recorder(vec, q), Recorder(vec, q)
    a = search(bundle.graph, sa, visited=VisitedSet(E), loop="compiled",
               clock=lambda: 10.0 if len(sa.calls) >= calls else 0.0, **kw)
    b = search(bundle.graph, sb, visited=VisitedSet(E), loop="fused",
               clock=lambda: 10.0 if len(sb.calls) >= calls else 0.0, **kw)
    assert a.partial and b.partial
    assert len(sa.calls) == len(sb.calls) == calls
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert [(s.layer, s.steps, s.seen) for s in a.layers] == [(s.layer, s.steps, s.seen) for s in b.layers]


def test_keep_rows_is_the_engine_filter_as_data() -> None:
    live = np.arange(E) % 5 != 0
    kr = keep_rows(lambda r: r % 2 == 0, live=live, excluded=(2, 4, 600), types=(0, 1))
    rows = np.arange(E, dtype=np.int64)
    want = (rows % 2 == 0) & live & ~np.isin(rows, [2, 4, 600]) & np.isin(rows % 3, [0, 1])
    np.testing.assert_array_equal(kr(rows), want)


def test_a_keep_callable_falls_back_to_the_compiled_loop(bundle) -> None:
    vec = np.asarray(bundle.vectors)
    q = np.random.default_rng(3).normal(size=vec.shape[1]).astype(np.float32)
    kw = {"k": 20, "ef": (16, 32, 64, 128), "steps": (1, 1, 1, 3), "top_n": (0, 0, 50, 50), "keep": lambda r: r % 2 == 0}
    a = search(bundle.graph, Recorder(vec, q), visited=VisitedSet(E), loop="compiled", **kw)
    b = search(bundle.graph, Recorder(vec, q), visited=VisitedSet(E), loop="fused", **kw)
    np.testing.assert_array_equal(a.rows, b.rows)
    assert (b.rows % 2 == 0).all()


def test_fused_loop_refuses_wrong_lengths(bundle) -> None:
    with pytest.raises(ValueError, match="one value per layer"):
        search(bundle.graph, lambda r: np.zeros(r.size, np.float32), k=5, ef=(8, 8), steps=(1, 1), top_n=(5, 5),
               visited=VisitedSet(E), loop="fused")


def test_a_scorer_giving_the_wrong_number_of_scores_is_refused(bundle) -> None:
    with pytest.raises(ValueError, match="expected"):
        search(bundle.graph, lambda r: np.zeros(r.size + 1, np.float32), k=5, ef=(8, 8, 8, 8), steps=(1, 1, 1, 1),
               top_n=(5, 5, 5, 5), visited=VisitedSet(E), loop="fused")


def test_engines_with_the_fused_and_compiled_loops_answer_alike(bundle) -> None:
    """The real scorer (onnxruntime): identical rows, scores (bit for bit), pairs and steps, with filters."""
    from service.engine import MatchEngine, SearchParams, UserFeatures

    params = SearchParams(exhaustive_threshold=0, filter_beam=True, seed_history=True)
    fused = MatchEngine(bundle, params=params, providers=["CPUExecutionProvider"], search_loop="fused")
    compiled = MatchEngine(bundle, params=params, providers=["CPUExecutionProvider"], search_loop="compiled")
    assert fused.search_loop == "fused"
    rng = np.random.default_rng(0)
    for i in range(12):
        seq = np.full(8, -1, dtype=np.int64)
        seq[-3:] = rng.integers(0, E, 3)
        u = UserFeatures(cat=rng.integers(0, 3, 2), num=rng.normal(size=2).astype(np.float32), seq=seq)
        kw = {"exclude_rows": rng.integers(0, E, 20)} if i % 2 else {"entity_types": [1]} if i % 3 == 0 else {}
        a = compiled.match(u, 0, 10 + 10 * (i % 3), **kw)
        b = fused.match(u, 0, 10 + 10 * (i % 3), **kw)
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.scores, b.scores)
        assert (a.stats.pair_evaluations, a.stats.steps, a.stats.scorer_calls) == (
            b.stats.pair_evaluations, b.stats.steps, b.stats.scorer_calls)
        assert [(s.layer, s.steps, s.seen) for s in a.stats.layers] == [(s.layer, s.steps, s.seen) for s in b.stats.layers]


def test_a_reused_visited_set_gives_what_a_fresh_one_gives(bundle) -> None:
    """90 requests (360 layers) on one visited set, as a worker thread runs them: the answers a fresh
    visited set gives, in all three loops (the fused loop reserves its layer stamps four at a time)."""
    vec = np.asarray(bundle.vectors)
    rng = np.random.default_rng(8)
    kw = {"k": 20, "ef": (16, 16, 32, 64), "steps": (1, 1, 2, 4), "top_n": (0, 0, 20, 40)}
    shared = {loop: VisitedSet(E) for loop in ("fused", "compiled", "numpy")}
    for _ in range(90):
        q = rng.normal(size=vec.shape[1]).astype(np.float32)
        want = search(bundle.graph, Recorder(vec, q), visited=VisitedSet(E), loop="fused", **kw)
        for loop, visited in shared.items():
            got = search(bundle.graph, Recorder(vec, q), visited=visited, loop=loop, **kw)
            np.testing.assert_array_equal(got.rows, want.rows)
            assert [s.seen for s in got.layers] == [s.seen for s in want.layers]
