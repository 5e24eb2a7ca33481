"""Batched lockstep search (service.lockstep, MatchEngine.match_many): the answers of one request at a time."""

from __future__ import annotations

import time

import numpy as np
import pytest

from contracts.bundle import Bundle, load_bundle
from contracts.graph import Graph
from service.engine import EngineRequest, MatchEngine, SearchError, SearchParams, UserFeatures
from service.lockstep import search_many
from service.scoring.host import CPU
from service.search import RequestBeam, VisitedSet, search
from tests.fixtures.fake_bundle import make_fake_bundle

E = 1500


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return load_bundle(make_fake_bundle(tmp_path_factory.mktemp("l") / "b", num_entities=E, dim=16, seed=5))


# Per request: k, search options (params that differ per request, filters, seeds, degree caps).
CASES = [
    (20, dict(ef=(16, 32, 64, 128), steps=(1, 1, 1, 3), top_n=(0, 0, 50, 50))),
    (35, dict(ef=(8, 8, 16, 60), steps=(1, 1, 2, 10), top_n=(8, 8, 16, 60), keep=lambda r: r % 3 != 0, filter_beam=True)),
    (10, dict(ef=(32, 8, 16, 40), steps=(2, 2, 2, 30), top_n=(4, 4, 4, 40), keep=lambda r: r % 2 == 0)),
    (25, dict(ef=(4, 8, 16, 50), steps=(1, 1, 1, 6), top_n=(3, 3, 10, 50), seeds=np.array([3, 30, 300]),
              max_degree=(0, 0, 0, 6), whole_top_layer_up_to=0)),
    (15, dict(ef=(16, 16, 16, 15), steps=(1, 0, 1, 0), top_n=(5, 5, 5, 15))),  # T = 0 layers: entry set only
]


def _scorers(vectors: np.ndarray, n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        table = (vectors @ rng.normal(size=vectors.shape[1])).astype(np.float32)
        out.append(lambda rows, t=table: t[rows])
    return out


def test_search_many_gives_every_request_the_answer_search_gives_it(bundle: Bundle) -> None:
    graph, vectors = bundle.graph, np.asarray(bundle.vectors)
    assert isinstance(graph, Graph)
    cases = CASES * 3  # 15 requests in one batch, several with identical options but other users
    scorers = _scorers(vectors, len(cases), seed=2)
    want = [search(graph, s, k=k, visited=VisitedSet(E), **kw) for s, (k, kw) in zip(scorers, cases, strict=True)]
    calls: list[int] = []

    def score_many(which: list[int], rows: list[np.ndarray]) -> list[np.ndarray]:
        assert all(r.size for r in rows) and len(set(which)) == len(which)
        calls.append(len(which))
        return [scorers[w](r) for w, r in zip(which, rows, strict=True)]

    beams = [RequestBeam(graph, k=k, visited=VisitedSet(E), **kw) for k, kw in cases]
    got = search_many(beams, score_many)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.scores, b.scores)
        assert [s.steps for s in a.layers] == [s.steps for s in b.layers]
        assert [s.seen for s in a.layers] == [s.seen for s in b.layers]
    # one call per lockstep step, many requests in most of them
    assert len(calls) < sum(a.steps + len(a.layers) for a in want) / 4
    assert max(calls) == len(cases)


def test_search_many_deadline_stops_only_the_late_request(bundle: Bundle) -> None:
    graph, vectors = bundle.graph, np.asarray(bundle.vectors)
    assert graph is not None
    s = _scorers(vectors, 2, seed=3)
    kw = dict(ef=(16, 32, 64, 128), steps=(1, 1, 1, 8), top_n=(0, 0, 50, 50))
    late = RequestBeam(graph, k=20, visited=VisitedSet(E), deadline=time.monotonic() - 1.0, **kw)
    on_time = RequestBeam(graph, k=20, visited=VisitedSet(E), **kw)
    a, b = search_many([late, on_time], lambda w, r: [s[i](x) for i, x in zip(w, r, strict=True)])
    assert a.partial and len(a.layers) == 1
    assert not b.partial and len(b.layers) == graph.num_layers
    ref = search(graph, s[1], k=20, visited=VisitedSet(E), **kw)
    np.testing.assert_array_equal(b.rows, ref.rows)


def _users(n: int, seed: int) -> list[UserFeatures]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        seq = np.full(8, -1, dtype=np.int64)
        h = int(rng.integers(0, 9))
        if h:
            seq[-h:] = rng.integers(0, E, h)
        out.append(UserFeatures(cat=rng.integers(0, 3, 2), num=rng.normal(size=2).astype(np.float32), seq=seq))
    return out


def _requests(engine: MatchEngine) -> list[EngineRequest]:
    wide = SearchParams(ef=(32, 16, 32, 300), steps=(1, 1, 2, 12), top_n=(8, 8, 16, 300), exhaustive_threshold=0)
    seeded = SearchParams(exhaustive_threshold=0, seed_history=True, max_degree=(0, 0, 0, 8), filter_beam=False)
    excl = np.arange(0, E, 7, dtype=np.int64)
    out = []
    for i, u in enumerate(_users(12, seed=4)):
        shape = i % 6
        out.append(EngineRequest(
            user=u, domain=i % 2, k=(10, 30, 50)[i % 3],
            exclude_rows=excl if shape in (1, 4) else None,
            entity_types=[0] if shape in (2, 4) else None,
            params=(None, wide, seeded, None, wide, None)[shape],
            mode="exhaustive" if shape == 5 else None,
        ))
    return out


def _single(engine: MatchEngine, r: EngineRequest):
    return engine.match(r.user, r.domain, r.k, exclude_rows=r.exclude_rows, entity_types=r.entity_types,
                        deadline=r.deadline, mode=r.mode, params=r.params)


def test_match_many_gives_every_request_the_answer_match_gives_it(bundle: Bundle) -> None:
    engine = MatchEngine(bundle, params=SearchParams(exhaustive_threshold=0), providers=[CPU])
    reqs = _requests(engine)
    got = engine.match_many(reqs)
    assert len(got) == len(reqs)
    for r, res in zip(reqs, got, strict=True):
        want = _single(engine, r)
        assert res.mode == want.mode
        np.testing.assert_array_equal(res.rows, want.rows)
        np.testing.assert_array_equal(res.scores, want.scores)
        assert res.stats.pair_evaluations == want.stats.pair_evaluations
        assert res.stats.steps == want.stats.steps
        assert res.stats.scorer_calls == want.stats.scorer_calls  # the steps that needed new scores
    graph_mode = [res for res in got if res.mode == "graph"]
    assert len(graph_mode) == 10 and all(res.stats.batch == 10 for res in graph_mode)


def test_match_many_with_one_merged_call_per_step(bundle: Bundle) -> None:
    """The GPU path's merge (BatchingScorer, here on host memory): same rows; scores to float rounding."""
    engine = MatchEngine(bundle, params=SearchParams(exhaustive_threshold=0), providers=[CPU], batch_requests=True)
    try:
        reqs = [r for r in _requests(engine) if r.mode is None]
        got = engine.match_many(reqs)
        assert all(res.stats.batch == len(reqs) for res in got)
        plain = MatchEngine(bundle, params=SearchParams(exhaustive_threshold=0), providers=[CPU])
        for r, res in zip(reqs, got, strict=True):
            want = _single(plain, r)
            np.testing.assert_array_equal(res.rows, want.rows)
            np.testing.assert_allclose(res.scores, want.scores, rtol=1e-5, atol=1e-6)
    finally:
        engine.close()


def test_match_many_refuses_a_bad_request_before_any_work(bundle: Bundle) -> None:
    engine = MatchEngine(bundle, params=SearchParams(exhaustive_threshold=0), providers=[CPU])
    u = _users(1, seed=0)[0]
    with pytest.raises(SearchError, match="k must be"):
        engine.match_many([EngineRequest(user=u, domain=0, k=5), EngineRequest(user=u, domain=0, k=0)])
    assert engine.match_many([]) == []
