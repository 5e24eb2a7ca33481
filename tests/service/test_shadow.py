"""The live search-quality monitor (service.shadow) and the beam options it watches (filtered beam, seeds)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from contracts.bundle import load_bundle
from contracts.features import UserFeatures
from service.bench.search_bench import held_out_queries
from service.engine import MatchEngine, SearchParams
from service.search import VisitedSet, search, search_layer
from service.shadow import ShadowMonitor, coverage, k_bucket
from tests.fixtures.fake_bundle import make_fake_bundle, make_fake_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[MatchEngine, Path]:
    root = tmp_path_factory.mktemp("shadow")
    bundle = make_fake_bundle(root / "bundle", num_entities=2000, seed=5)
    data = make_fake_dataset(root / "data", bundle, num_users=80, seed=5)
    return MatchEngine(load_bundle(bundle), params=SearchParams(ef=(4, 2, 2, 10)), providers=["CPUExecutionProvider"]), data


def test_monitor_coverage_equals_the_benchmarks_on_the_same_queries(setup) -> None:
    engine, data = setup
    q = held_out_queries(data, engine.bundle, 30, 0)
    monitor = ShadowMonitor(rate=1.0, start=False)
    k = 20
    mine, bench = [], []
    for u, d in zip(q.features, q.domains, strict=True):
        res = engine.match(u, int(d), k, mode="graph")
        exact = engine.match(u, int(d), k, mode="exhaustive").rows
        bench.append(np.intersect1d(res.rows, exact[:k]).size / k)  # search_bench's definition
        labels = {"domain": engine.bundle.schema.domains[int(d)], "k_bucket": "50"}
        before = REGISTRY.get_sample_value("unimatch_search_shadow_coverage_sum", labels) or 0.0
        mine.append(monitor.run_job(_job(engine, int(d), k, u, res)))
        after = REGISTRY.get_sample_value("unimatch_search_shadow_coverage_sum", labels)
        assert after - before == pytest.approx(mine[-1])
    assert mine == pytest.approx(bench)
    assert min(bench) < 1.0  # the narrow beam misses some: the equality is not 1 == 1


def _job(engine: MatchEngine, d: int, k: int, u: UserFeatures, res):
    from service.shadow import ShadowJob

    return ShadowJob(engine=engine, domain=d, domain_name=engine.bundle.schema.domains[d], k=k, user=u,
                     served_rows=np.asarray(res.rows), exclude_rows=None, entity_types=None)


def test_offer_never_blocks_and_drops_when_the_queue_is_full(setup) -> None:
    engine, _ = setup
    u = UserFeatures.cold_start(engine.bundle.schema)
    res = engine.match(u, 0, 10, mode="graph")
    monitor = ShadowMonitor(rate=1.0, queue_size=2, start=False)  # no worker: the queue only fills
    t0 = time.perf_counter()
    taken = [monitor.offer(engine, 0, 10, u, res) for _ in range(5)]
    assert time.perf_counter() - t0 < 1.0  # a generous bound: five puts, no scoring
    assert taken == [True, True, False, False, False] and monitor.dropped == 3


def test_offer_samples_only_whole_graph_answers(setup) -> None:
    engine, _ = setup
    u = UserFeatures.cold_start(engine.bundle.schema)
    res = engine.match(u, 0, 10, mode="exhaustive")
    assert not ShadowMonitor(rate=1.0, start=False).offer(engine, 0, 10, u, res)  # nothing to compare
    res = engine.match(u, 0, 10, mode="graph")
    assert not ShadowMonitor(rate=0.0, start=False).offer(engine, 0, 10, u, res)
    res.partial = True
    assert not ShadowMonitor(rate=1.0, start=False).offer(engine, 0, 10, u, res)  # a deadline cut, not the search
    sampled = ShadowMonitor(rate=0.25, start=False, seed=1, queue_size=1000)
    res.partial = False
    n = sum(sampled.offer(engine, 0, 10, u, res) for _ in range(400))
    assert 60 < n < 140


def test_worker_rests_to_its_cpu_share(setup) -> None:
    engine, _ = setup
    u = UserFeatures.cold_start(engine.bundle.schema)
    res = engine.match(u, 0, 10, mode="graph")
    rests: list[float] = []
    monitor = ShadowMonitor(rate=1.0, cpu_share=0.2, sleep=rests.append)
    monitor.offer(engine, 0, 10, u, res)
    for _ in range(200):
        if rests:
            break
        time.sleep(0.02)
    monitor.close()
    assert monitor.done == 1 and len(rests) == 1 and rests[0] > 0  # rest = 4 x the work at a 20% share


def test_a_background_scan_yields_before_each_call_and_gives_the_same_answer(setup) -> None:
    engine, _ = setup
    u = UserFeatures.cold_start(engine.bundle.schema)
    q = engine.query(u, 0, 50)
    plain = engine.run(q, mode="exhaustive")
    hooks: list[int] = []
    bg = engine.run(q, mode="exhaustive", between_chunks=lambda: hooks.append(engine.active_searches))
    np.testing.assert_array_equal(bg.rows, plain.rows)
    np.testing.assert_array_equal(bg.scores, plain.scores)
    assert engine.background_chunk < engine.exhaustive_chunk or engine.background_chunk == engine.scorer.max_batch
    assert len(hooks) == bg.stats.scorer_calls == -(-q.eligible // engine.background_chunk) > 1
    assert hooks == [0] * len(hooks)  # a background scan is not counted as a request being answered
    seen: list[int] = []
    engine.scorer.score_timed, real = (lambda ctx, rows: (seen.append(engine.active_searches), real(ctx, rows))[1],
                                       engine.scorer.score_timed)
    try:
        engine.run(q, mode="exhaustive")
    finally:
        del engine.scorer.score_timed
    assert seen and set(seen) == {1} and engine.active_searches == 0  # a request is, while it runs


@contextmanager
def _requests_in_flight(engine: MatchEngine, end_after_polls: int) -> Iterator[tuple[list[int], list[float], Callable]]:
    """Records the requests in flight at every scorer call, and gives a ``sleep`` for the monitor that
    ends one request in flight after ``end_after_polls`` polls; every request still open is ended after."""
    in_flight_at_call: list[int] = []
    polls: list[float] = []
    real = engine.scorer.score_timed

    def score(ctx, rows):
        in_flight_at_call.append(engine.active_searches)
        return real(ctx, rows)

    def sleep(s: float) -> None:
        polls.append(s)
        if len(polls) == end_after_polls:
            engine.activity.__exit__(None, None, None)

    engine.scorer.score_timed = score
    try:
        yield in_flight_at_call, polls, sleep
    finally:
        while engine.active_searches:
            engine.activity.__exit__(None, None, None)
        del engine.scorer.score_timed


def test_the_monitor_scores_only_while_a_cpu_is_free_and_drops_a_starved_job(setup) -> None:
    engine, _ = setup
    u = UserFeatures.cold_start(engine.bundle.schema)
    res = engine.match(u, 0, 10, mode="graph")
    # three polls with every CPU taken, then the request ends
    with _requests_in_flight(engine, end_after_polls=3) as (in_flight_at_call, polls, sleep):
        monitor = ShadowMonitor(rate=1.0, start=False, cpus=1, sleep=sleep, poll_s=0.001, max_wait_s=1.0)
        engine.activity.__enter__()  # a request in flight on the only CPU
        cov = monitor.run_job(_job(engine, 0, 10, u, res))
        assert cov is not None and polls == [0.001] * 3 and in_flight_at_call and set(in_flight_at_call) == {0}
        starved = ShadowMonitor(rate=1.0, start=False, cpus=1, sleep=lambda s: None, poll_s=0.01, max_wait_s=0.05)
        engine.activity.__enter__()  # and this one never ends: the job gives up, counted, no coverage recorded
        before = REGISTRY.get_sample_value("unimatch_search_shadow_dropped_total") or 0.0
        assert starved.run_job(_job(engine, 0, 10, u, res)) is None
        assert starved.starved == starved.dropped == 1 and starved.done == 0
        assert REGISTRY.get_sample_value("unimatch_search_shadow_dropped_total") == before + 1


def test_the_monitor_keeps_a_spare_cpu_for_arriving_requests(setup) -> None:
    engine, _ = setup
    u = UserFeatures.cold_start(engine.bundle.schema)
    res = engine.match(u, 0, 10, mode="graph")
    # two polls with one of the two CPUs serving a request, then it ends
    with _requests_in_flight(engine, end_after_polls=2) as (in_flight_at_call, polls, sleep):
        # default (1 spare): on 2 CPUs, one request in flight is enough to wait
        monitor = ShadowMonitor(rate=1.0, start=False, cpus=2, sleep=sleep, poll_s=0.001, max_wait_s=1.0)
        assert monitor.busy_limit == 0
        engine.activity.__enter__()
        assert monitor.run_job(_job(engine, 0, 10, u, res)) is not None
        assert polls == [0.001] * 2 and in_flight_at_call and set(in_flight_at_call) == {0}
        # spare 0 (the sixth session's rule): a chunk starts beside the one request, no wait
        in_flight_at_call.clear()
        polls.clear()
        anyfree = ShadowMonitor(rate=1.0, start=False, cpus=2, sleep=sleep, poll_s=0.001, max_wait_s=1.0, spare_cpus=0)
        engine.activity.__enter__()
        assert anyfree.run_job(_job(engine, 0, 10, u, res)) is not None
        assert polls == [] and set(in_flight_at_call) == {1}
    assert ShadowMonitor(rate=0.0, start=False, cpus=16).busy_limit == 14
    with pytest.raises(ValueError, match="spare_cpus"):
        ShadowMonitor(rate=0.0, start=False, spare_cpus=-1)


def test_the_monitor_thread_runs_at_the_idle_priority(setup) -> None:
    monitor = ShadowMonitor(rate=1.0)
    try:
        for _ in range(200):
            if monitor.priority_applied is not None:
                break
            time.sleep(0.01)
        assert monitor.priority_applied in ("idle", "nice 19")  # idle on Linux; nice where SCHED_IDLE is refused
    finally:
        monitor.close()


def test_helpers() -> None:
    assert coverage(np.array([1, 2, 3]), np.array([2, 3, 4, 5])) == 0.5
    assert coverage(np.array([1]), np.array([], dtype=np.int64)) == 1.0
    assert [k_bucket(k) for k in (1, 10, 11, 200, 201, 5000, 20000)] == ["10", "10", "50", "200", "1000", "10000", "inf"]


# ---- beam options ---------------------------------------------------------------------------------------------
def test_filtered_beam_holds_only_returnable_rows_when_there_are_enough(setup) -> None:
    engine, _ = setup
    graph = engine.bundle.graph
    rng = np.random.default_rng(0)
    score_of = rng.normal(size=engine.bundle.num_entities).astype(np.float32)
    allowed = rng.random(engine.bundle.num_entities) < 0.3

    def score(rows: np.ndarray) -> np.ndarray:
        return score_of[rows]

    def prefer(rows: np.ndarray) -> np.ndarray:
        return allowed[rows]

    ep = np.arange(50, dtype=np.int64)
    v = VisitedSet(engine.bundle.num_entities)
    v.new_request()
    w_plain, *_ = search_layer(graph, 0, ep, ef=10, steps=5, score=score, visited=v)
    v.new_request()
    w_pref, _, s_rows, *_ = search_layer(graph, 0, ep, ef=10, steps=5, score=score, visited=v, prefer=prefer)
    assert allowed[s_rows].sum() >= 10 and allowed[w_pref].all()
    assert not allowed[w_plain].all()  # the plain beam shares its slots with rows that can never be returned


def test_filtered_beam_is_identical_when_every_row_is_returnable(setup) -> None:
    engine, _ = setup
    u = UserFeatures.cold_start(engine.bundle.schema)
    on = engine.match(u, 0, 20, mode="graph", params=SearchParams(filter_beam=True))  # domain 0 holds everything
    off = engine.match(u, 0, 20, mode="graph", params=SearchParams(filter_beam=False))
    assert np.array_equal(on.rows, off.rows) and on.stats.pair_evaluations == off.stats.pair_evaluations


def test_history_seeds_are_scored_in_the_bottom_layer(setup) -> None:
    engine, _ = setup
    graph = engine.bundle.graph
    calls: list[np.ndarray] = []

    def score(rows: np.ndarray) -> np.ndarray:
        calls.append(rows.copy())
        return -rows.astype(np.float32)

    seeds = np.array([1999, 1500, 1234], dtype=np.int64)
    v = VisitedSet(engine.bundle.num_entities)
    search(graph, score, k=5, ef=(4, 2, 2, 5), steps=(1, 1, 1, 1), top_n=(0, 0, 0, 5), visited=v, seeds=seeds)
    assert np.isin(seeds, np.concatenate(calls)).all()
