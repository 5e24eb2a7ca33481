"""Live catalogue: upserts searchable, paused never returned (graph and exhaustive), replay, two workers on one log."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from contracts.bundle import Bundle, load_bundle
from service.engine import MatchEngine, SearchParams, UserFeatures
from service.live import LiveError, check_change
from service.scoring.host import CPU
from tests.fixtures.fake_bundle import make_fake_bundle
from tests.service.conftest import REDIS_URL

E = 1500
GRAPH_ONLY = SearchParams(exhaustive_threshold=0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return load_bundle(make_fake_bundle(tmp_path_factory.mktemp("live") / "b", num_entities=E, dim=16, seed=2))


def engine_of(bundle: Bundle, capacity: int = 400) -> MatchEngine:
    return MatchEngine(bundle, params=GRAPH_ONLY, providers=[CPU], live_capacity=capacity)


def users(n: int, seed: int = 0) -> list[UserFeatures]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        seq = np.full(8, -1, dtype=np.int64)
        h = int(rng.integers(1, 9))
        seq[-h:] = rng.integers(0, E, h)
        out.append(UserFeatures(cat=rng.integers(0, 3, 2), num=rng.normal(size=2).astype(np.float32), seq=seq))
    return out


def upsert(ids: list[str], *, category: int = 3, price: float = 0.5, domains: tuple[str, ...] = ("domain_0", "domain_1")) -> dict:
    return {"op": "upsert", "entities": [
        {"entity_id": i, "entity_type": "item", "domains": list(domains), "categorical": {"category": category},
         "numeric": {"price": price}} for i in ids]}


class Positions:
    """Monotonic fake stream ids for tests without Redis."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"0-{self.n}"


def test_changes_are_validated_before_logging(bundle: Bundle) -> None:
    check_change(bundle.schema, upsert(["new-1"]))
    bad = [
        {"op": "explode"},
        {"op": "upsert", "entities": []},
        upsert(["x"], domains=("nowhere",)),
        {"op": "upsert", "entities": [{"entity_id": "x", "entity_type": "item", "domains": ["domain_0"],
                                       "categorical": {"category": 99}}]},
        {"op": "upsert", "entities": [{"entity_id": "x", "entity_type": "item", "domains": ["domain_0"],
                                       "numeric": {"price": float("nan")}}]},
        {"op": "upsert", "entities": [{"entity_id": "x", "entity_type": "item", "domains": ["domain_0"],
                                       "numeric": {"colour": 1.0}}]},
        {**upsert(["x"]), "entities": upsert(["x"])["entities"] * 2},
        {"op": "pause", "ids": []},
    ]
    for change in bad:
        with pytest.raises(LiveError):
            check_change(bundle.schema, change)


def test_upserted_entities_are_found_and_changed_ones_replace_their_old_row(bundle: Bundle) -> None:
    eng = engine_of(bundle)
    live = eng.live
    assert live is not None
    pos = Positions()
    base_row = bundle.row_of("ent-000010")
    res = live.apply(pos(), upsert(["new-a", "new-b", "ent-000010"]))
    assert res.rows == [E, E + 1, E + 2]
    assert eng.row_of("new-a") == E and eng.row_of("ent-000010") == E + 2
    assert not live.live[base_row] and live.live[E + 2]
    assert eng.ids_of(np.array([E + 1, 5])) == ["new-b", "ent-000005"]
    # the changed entity kept its id embedding: with default features it encodes to its old vector
    live.apply(pos(), {"op": "upsert", "entities": [
        {"entity_id": "ent-000011", "entity_type": "item", "domains": ["domain_0"]}]})
    np.testing.assert_allclose(live.tables["ent_uee"][3], bundle.entity_tensors["ent_uee"][11], atol=1e-5)
    # every new row is reachable: a user whose history is that entity's neighbourhood finds it
    wide = SearchParams(ef=(64, 64, 64, 400), steps=(2, 2, 4, 20), top_n=(64, 64, 64, 400), exhaustive_threshold=0)
    for u in users(4, seed=1):
        g = eng.match(u, 0, 50, params=wide)
        x = eng.match(u, 0, 50, mode="exhaustive")
        assert len(set(g.rows.tolist()) & set(x.rows.tolist())) >= 45
        assert base_row not in g.rows and base_row not in x.rows
    # exhaustive mode scores new rows too: some query ranks them
    x_rows = np.concatenate([eng.match(u, 0, 200, mode="exhaustive").rows for u in users(10, seed=2)])
    assert (x_rows >= E).any()
    # counts follow: domain_1 lost ent-000011 (now domain_0 only)
    assert eng.eligible_count(0) == int((np.asarray(bundle.domain_mask) & 1 != 0).sum()) + 2
    info = eng.info()["live"]
    assert info["overlay_rows"] == 4 and info["position"] == "0-2"


def test_paused_entities_are_never_returned_graph_and_exhaustive(bundle: Bundle) -> None:
    eng = engine_of(bundle)
    live = eng.live
    assert live is not None
    pos = Positions()
    live.apply(pos(), upsert([f"n{i}" for i in range(30)], category=1))
    us = users(12, seed=4)
    paused: set[int] = set()
    for round_ in range(3):
        # pause what the users get now: the best-scored entities are the ones a filter bug would leak
        top = {int(r) for u in us for r in eng.match(u, round_ % 2, 20).rows[:6]}
        ids = eng.ids_of(np.array(sorted(top)))
        live.apply(pos(), {"op": "pause", "ids": ids})
        paused |= top
        for u in us:
            for domain in (0, 1):
                for mode in ("graph", "exhaustive"):
                    got = set(eng.match(u, domain, 40, mode=mode).rows.tolist())
                    assert not got & paused, (round_, mode)
    assert len(paused) >= 20
    # resume brings them back; delete takes one away for good (resume cannot revive it)
    first = sorted(paused)[0]
    eid = eng.ids_of(np.array([first]))[0]
    live.apply(pos(), {"op": "resume", "ids": [eid]})
    assert live.live[first]
    live.apply(pos(), {"op": "delete", "ids": [eid]})
    assert not live.live[first] and eng.row_of(eid) is None
    res = live.apply(pos(), {"op": "resume", "ids": [eid, "never-seen"]})
    assert res.skipped == 2 and not live.live[first]
    # an upsert of a paused id stays paused
    pid = eng.ids_of(np.array([sorted(paused)[1]]))[0]
    live.apply(pos(), upsert([pid]))
    assert not live.live[eng.row_of(pid)]


def _state(eng: MatchEngine) -> tuple:
    live = eng.live
    assert live is not None and live.overlay is not None
    ov = live.overlay
    n = live.E + live.count
    lists = tuple(tuple(ov.neighbours(layer, r).tolist()) for layer in range(ov.layers) for r in range(n))
    return (live.position, live.count, tuple(live.ids), live.live[:n].tobytes(), live.tables["ent_uee"][: live.count].tobytes(),
            ov.levels[: live.count].tobytes(), lists, tuple(sorted(live.paused)))


def _changes(n: int) -> list[dict]:
    rng = np.random.default_rng(9)
    out: list[dict] = []
    for i in range(n):
        if i % 4 == 3:
            out.append({"op": "pause", "ids": [f"ent-{int(rng.integers(0, E)):06d}", f"live-{i - 1}-0"]})
        else:
            out.append(upsert([f"live-{i}-{j}" for j in range(5)] + [f"ent-{int(rng.integers(0, E)):06d}"],
                              category=int(rng.integers(0, 9)), price=float(rng.normal())))
    return out


def test_replay_gives_the_same_state(bundle: Bundle) -> None:
    a, b = engine_of(bundle), engine_of(bundle)
    changes = _changes(12)
    for i, ch in enumerate(changes):
        a.live.apply(f"1-{i}", ch)  # type: ignore[union-attr]
    for i, ch in enumerate(changes):  # a restarted worker replays the same log
        b.live.apply(f"1-{i}", ch)  # type: ignore[union-attr]
    assert _state(a) == _state(b)
    # an entry at or before the position is never applied twice
    before = _state(a)
    a.live.apply("1-3", changes[3])  # type: ignore[union-attr]
    assert _state(a) == before


@pytest.fixture
def change_log(redis_prefix: str):
    from service.changes import ChangeLog, stream_key

    log = ChangeLog.from_url(REDIS_URL, stream_key(f"{redis_prefix}:", "lineage-x"))
    yield log
    log.client.close()


def test_two_workers_converge_on_one_log_and_a_restart_replays_it(bundle: Bundle, change_log) -> None:
    from service.changes import ChangeFollower

    w1, w2 = engine_of(bundle), engine_of(bundle)
    f1 = ChangeFollower(change_log, w1.live, poll_s=0.05)  # type: ignore[arg-type]
    f2 = ChangeFollower(change_log, w2.live, poll_s=0.05)  # type: ignore[arg-type]
    f2.start()  # worker 2 follows in the background; worker 1 acknowledges
    try:
        last = "0-0"
        for ch in _changes(10):
            last = change_log.append(ch)
            f1.catch_up(last)  # the acknowledging worker applies before it answers
            assert w1.live.position == last  # type: ignore[union-attr]
        deadline = threading.Event()
        for _ in range(100):
            if w2.live.position == last:  # type: ignore[union-attr]
                break
            deadline.wait(0.05)
        assert w2.live.position == last  # type: ignore[union-attr]
    finally:
        f2.stop()
    assert _state(w1) == _state(w2)
    # a worker restarted on the bundle replays the log from the start
    w3 = engine_of(bundle)
    f3 = ChangeFollower(change_log, w3.live)  # type: ignore[arg-type]
    assert f3.replay() == 10
    assert _state(w3) == _state(w1)


def test_a_full_overlay_refuses_the_upsert(bundle: Bundle) -> None:
    eng = engine_of(bundle, capacity=3)
    with pytest.raises(LiveError, match="full"):
        eng.live.apply("0-1", upsert(["a", "b", "c", "d"]))  # type: ignore[union-attr]
    assert eng.live.count == 0  # type: ignore[union-attr]




def test_compaction_folds_the_log_and_the_new_version_replays_only_what_came_after(
    bundle: Bundle, change_log, redis_prefix: str, tmp_path: Path
) -> None:
    from service.changes import ChangeFollower, ChangeLog, stream_key
    from service.compact import compact

    lineage = bundle.version
    log = ChangeLog.from_url(REDIS_URL, stream_key(f"{redis_prefix}:", lineage))
    w = engine_of(bundle)
    f = ChangeFollower(log, w.live)  # type: ignore[arg-type]
    changes = _changes(8)
    for ch in changes:
        f.catch_up(log.append(ch))
    folded = w.live.position  # type: ignore[union-attr]
    out = tmp_path / "v2"
    report = compact(bundle=bundle.path, out=out, redis_url=REDIS_URL, prefix=redis_prefix)
    assert report["position"] == folded and report["rows_added"] == w.live.count  # type: ignore[union-attr]
    v2 = load_bundle(out)  # checksums, graph validity: an ordinary bundle
    assert v2.num_entities == E + w.live.count and v2.manifest["live"]["lineage"] == lineage  # type: ignore[union-attr]
    assert v2.manifest["live"]["feature_rows"] == E and "calibration" not in v2.manifest
    # one more change after the compaction: the new version's worker replays only that one
    late = log.append({"op": "pause", "ids": ["live-0-1"]})
    f.catch_up(late)
    e2 = engine_of(v2)
    f2 = ChangeFollower(log, e2.live)  # type: ignore[arg-type]
    assert f2.replay() == 1 and e2.live.count == 0 and e2.live.position == late  # type: ignore[union-attr]
    # same answers as the worker that kept everything in its overlay (same graph, same live rows)
    for u in users(6, seed=8):
        for mode in ("graph", "exhaustive"):
            a, b = w.match(u, 0, 20, mode=mode), e2.match(u, 0, 20, mode=mode)
            assert w.ids_of(a.rows) == e2.ids_of(b.rows), mode
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    assert e2.row_of("live-0-1") is not None and not e2.live.live[e2.row_of("live-0-1")]  # type: ignore[union-attr,index]
    log.client.close()


def test_compact_cli_refuses_bad_input_in_one_line(bundle: Bundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unimatch.cli import main

    assert main(["index", "compact", "--bundle", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not a bundle directory" in capsys.readouterr().err
    assert main(["index", "compact", "--bundle", str(bundle.path), "--out", str(bundle.path)]) == 2
    assert "new bundle version" in capsys.readouterr().err
    # --out holding someone else's files: refused with --force too, nothing deleted
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    for force in ([], ["--force"]):
        assert main(["index", "compact", "--bundle", str(bundle.path), "--out", str(theirs), *force]) == 2
        assert (theirs / "notes.txt").read_text() == "keep me"
    # an earlier bundle of ours there: replaced only with --force (refused here before any Redis read)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "manifest.json").write_text('{"format_version": 1}')
    assert main(["index", "compact", "--bundle", str(bundle.path), "--out", str(ours)]) == 2
    assert "--force" in capsys.readouterr().err.strip().splitlines()[-1]
    assert (ours / "manifest.json").read_text() == '{"format_version": 1}'


def test_an_entry_written_around_the_api_is_skipped_alike_by_every_worker(bundle: Bundle, change_log) -> None:
    from service.changes import ChangeFollower

    a, b = engine_of(bundle), engine_of(bundle)
    change_log.append(upsert(["ok-1"]))
    bad = change_log.append({"op": "upsert", "entities": [{"entity_id": "x", "entity_type": "planet", "domains": ["domain_0"]}]})
    last = change_log.append({"op": "pause", "ids": ["ok-1"]})
    fa, fb = ChangeFollower(change_log, a.live), ChangeFollower(change_log, b.live)  # type: ignore[arg-type]
    assert fa.catch_up(bad) is None  # not applied: the route answers 503, nothing acknowledged
    assert fa.catch_up(last) is not None and fb.replay() == 2
    assert fa.errors == fb.errors == 1 and _state(a) == _state(b) and a.live.position == last  # type: ignore[union-attr]


def test_match_many_on_a_live_graph_gives_match_s_answers(bundle: Bundle) -> None:
    # the lockstep's compiled steps walk the overlay too (before, a live engine answered one by one)
    from service.engine import EngineRequest

    eng = engine_of(bundle, capacity=300)
    live = eng.live
    assert live is not None
    pos = Positions()
    for b in range(6):
        live.apply(pos(), upsert([f"lock-{b}-{i}" for i in range(40)], category=b % 3 + 1, price=0.1 * b))
    live.apply(pos(), {"op": "pause", "ids": ["lock-0-1", "ent-000003"]})
    reqs = [EngineRequest(user=u, domain=i % 2, k=40) for i, u in enumerate(users(8, seed=5))]
    got = eng.match_many(reqs)
    assert all(r.stats.batch == len(reqs) for r in got)  # all in one lockstep
    new_rows = 0
    for r, res in zip(reqs, got, strict=True):
        want = eng.match(r.user, r.domain, r.k)
        np.testing.assert_array_equal(res.rows, want.rows)
        np.testing.assert_array_equal(res.scores, want.scores)
        assert res.stats.pair_evaluations == want.stats.pair_evaluations
        new_rows += int((res.rows >= E).sum())
        assert not np.isin([eng.row_of("lock-0-1") or -1, 3], res.rows).any()
    assert new_rows > 0
