"""Bundle rollout by pointer (service/bundle_watch.py): the atomic swap, and workers that follow it.

Two apps in one event loop stand for two workers (or pods) watching the same ``current`` symlink, as
in test_reload.py; requests hammer both while the pointer moves, and every answer must be a 200 that
comes wholly from the bundle it names.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from service import bundle_watch
from service.app import create_app
from service.config import Settings
from service.errors import ReloadFailed

REQ = {"user_id": "user-0007", "domain": "domain_0", "k": 10}


def _versions(tmp_path: Path, *bundles: Path) -> tuple[Path, list[Path]]:
    """root/versions/vN -> the given bundles (symlinked dirs stand for copies), root/current unset."""
    root = tmp_path / "bundles"
    (root / "versions").mkdir(parents=True)
    out = []
    for i, b in enumerate(bundles):
        v = root / "versions" / f"v{i}"
        v.symlink_to(b, target_is_directory=True)
        out.append(v)
    return root, out


def test_publish_swaps_a_relative_symlink_and_leaves_nothing_behind(bundle_dir: Path, bundle2_dir: Path, tmp_path: Path) -> None:
    root, (v0, v1) = _versions(tmp_path, bundle_dir, bundle2_dir)
    pointer = root / "current"
    assert bundle_watch.publish(v0, pointer) == bundle_dir.resolve()
    bundle_watch.publish(v1, pointer)
    assert os.readlink(pointer) == "versions/v1" and pointer.resolve() == bundle2_dir.resolve()
    assert sorted(p.name for p in root.iterdir()) == ["current", "versions"], "no temporary link left"


def test_publish_refuses_the_old_layout_and_non_bundles(bundle_dir: Path, tmp_path: Path) -> None:
    root, (v0,) = _versions(tmp_path, bundle_dir)
    (root / "current").mkdir()
    (root / "current/keep").write_text("served")
    with pytest.raises(bundle_watch.PublishError, match="is a directory"):
        bundle_watch.publish(v0, root / "current")
    assert (root / "current/keep").read_text() == "served"
    (tmp_path / "empty").mkdir()
    with pytest.raises(bundle_watch.PublishError, match="not a bundle"):
        bundle_watch.publish(tmp_path / "empty", tmp_path / "bundles/other")


def test_a_reader_never_sees_no_bundle_while_the_pointer_flips(bundle_dir: Path, bundle2_dir: Path, tmp_path: Path) -> None:
    """The property the two-`mv` publish lacked: resolving `current` always finds a manifest."""
    root, versions = _versions(tmp_path, bundle_dir, bundle2_dir)
    pointer = root / "current"
    bundle_watch.publish(versions[0], pointer)
    misses: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            if bundle_watch.bundle_version(pointer) is None:
                misses.append("none")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(300):
            bundle_watch.publish(versions[i % 2], pointer)
    finally:
        stop.set()
        t.join()
    assert misses == []


def test_unused_versions_keeps_current_and_served(bundle_dir: Path, bundle2_dir: Path, tmp_path: Path) -> None:
    from tests.fixtures.fake_bundle import make_fake_bundle

    third = make_fake_bundle(tmp_path / "third", num_entities=300, seed=5)
    root, (v0, v1, v2) = _versions(tmp_path, bundle_dir, bundle2_dir, third)
    bundle_watch.publish(v2, root / "current")
    served = {bundle_watch.bundle_version(v1)}
    assert bundle_watch.unused_versions(root / "versions", root / "current", served) == [v0]
    assert bundle_watch.unused_versions(root / "versions", root / "current", set()) == [v0, v1]


class _FakeState:
    def __init__(self, version: str, refuse: bool = False) -> None:
        self.serving_version: str | None = version
        self.refuse = refuse
        self.calls: list[Path] = []

    async def reload_bundle(self, target: Path, *, wait: bool, broadcast: bool = True) -> object:
        assert wait and not broadcast, "the watcher reloads its own worker, synchronously"
        self.calls.append(target)
        if self.refuse:
            raise ReloadFailed("bad bundle")
        self.serving_version = bundle_watch.bundle_version(target)
        return None


def test_watch_staggers_and_does_not_retry_a_refused_bundle(bundle_dir: Path, bundle2_dir: Path, tmp_path: Path) -> None:
    root, (v0, v1) = _versions(tmp_path, bundle_dir, bundle2_dir)
    pointer = root / "current"
    bundle_watch.publish(v0, pointer)
    delays: list[float] = []

    class Rng(random.Random):
        def uniform(self, a: float, b: float) -> float:
            delays.append(b)
            return 0.01

    async def run(state: _FakeState) -> None:
        task = asyncio.create_task(bundle_watch.watch(state, pointer, poll_s=0.01, stagger_s=7.5, rng=Rng()))
        await asyncio.sleep(0.1)
        bundle_watch.publish(v1, pointer)
        await asyncio.sleep(0.3)
        task.cancel()

    ok = _FakeState(str(bundle_watch.bundle_version(bundle_dir)))
    asyncio.run(run(ok))
    assert ok.calls == [bundle2_dir.resolve()] and ok.serving_version == bundle_watch.bundle_version(bundle2_dir)
    assert delays == [7.5]
    refused = _FakeState(str(bundle_watch.bundle_version(bundle_dir)), refuse=True)
    asyncio.run(run(refused))
    assert refused.calls == [bundle2_dir.resolve()], "a refused bundle is not reloaded again and again"


def test_two_workers_follow_the_pointer_under_load_with_zero_failures(
    bundle_dir: Path, bundle2_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    """Every answer through the rollout is a 200 from the bundle it names, on both workers.

    Each step waits for a condition (both workers answered from v0; both report v1; both answered
    from v1 since), bounded by a generous time, never for a fixed time: the fixed 0.2 s before the
    swap and 0.1 s after it were fixed times on a loaded host. The deadline is one no search misses on
    any host: with the default 100 ms, 8 requests in flight on 2 scoring threads of a starved host can
    be answered 503 by admission control (which has an empty bundle_version, failing the last check),
    a refusal that is not the rollout's; tests/service/test_admission.py covers the shedding.
    """
    root, (v0, v1) = _versions(tmp_path, bundle_dir, bundle2_dir)
    pointer = root / "current"
    bundle_watch.publish(v0, pointer)
    settings = Settings(bundle=pointer, data=dataset_dir, bundle_watch=True, bundle_watch_poll_s=0.05,
                        bundle_watch_stagger_s=0.5, deadline_ms=60_000)
    bound_s = 120.0  # a bound on each wait (a hung rollout fails the test), not a timing

    async def run() -> tuple[list[tuple[str, int, str]], dict[str, str]]:
        a, b = create_app(settings), create_app(settings)
        answers: list[tuple[str, int, str]] = []  # (worker, status, bundle_version)
        async with a.router.lifespan_context(a), b.router.lifespan_context(b):
            clients = {name: httpx.AsyncClient(transport=httpx.ASGITransport(app=x), base_url="http://w")
                       for name, x in (("a", a), ("b", b))}
            stop = asyncio.Event()

            async def hammer(name: str, client: httpx.AsyncClient) -> None:
                while not stop.is_set():
                    r = await client.post("/match", json=REQ)
                    answers.append((name, r.status_code, r.json().get("bundle_version", "")))

            async def until(cond: Callable[[], bool], what: str) -> None:
                loop = asyncio.get_running_loop()
                end = loop.time() + bound_s
                while not cond():
                    assert loop.time() < end, f"not within {bound_s:.0f} s: {what}"
                    await asyncio.sleep(0.01)

            def served(version: str, since: int = 0) -> bool:
                return all(any(w == name and v.endswith(version) for w, _, v in answers[since:]) for name in clients)

            tasks = [asyncio.create_task(hammer(n, c)) for n, c in clients.items() for _ in range(4)]
            await until(lambda: served("fake0000"), "both workers answer from v0")
            bundle_watch.publish(v1, pointer)
            info: dict[str, str] = {}

            async def switched() -> bool:
                info.update({n: (await c.get("/v1/info")).json()["bundle_version"] for n, c in clients.items()})
                return all(v.endswith("fake0001") for v in info.values())

            loop = asyncio.get_running_loop()
            end = loop.time() + bound_s
            while not await switched():
                assert loop.time() < end, f"the workers did not both switch within {bound_s:.0f} s: {info}"
                await asyncio.sleep(0.05)
            mark = len(answers)
            await until(lambda: served("fake0001", since=mark), "both workers answer from v1 after the switch")
            stop.set()
            await asyncio.gather(*tasks)
            for c in clients.values():
                await c.aclose()
        return answers, info

    answers, info = asyncio.run(run())
    assert all(v.endswith("fake0001") for v in info.values()), info
    assert {code for _, code, _ in answers} == {200}, "a request failed during the rollout"
    assert any(v.endswith("fake0000") for _, _, v in answers) and answers[-1][2].endswith("fake0001")


def _info_server(version: str):
    import http.server
    import json as _json

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = _json.dumps({"bundle_version": version}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_cli_deletes_only_versions_no_worker_serves(bundle_dir: Path, bundle2_dir: Path, tmp_path: Path, capsys) -> None:
    from tests.fixtures.fake_bundle import make_fake_bundle

    third = make_fake_bundle(tmp_path / "third", num_entities=300, seed=5)
    root, (v0, v1, v2) = _versions(tmp_path, bundle_dir, bundle2_dir, third)
    assert bundle_watch.main(["publish", str(v2), "--pointer", str(root / "current")]) == 0
    srv = _info_server(str(bundle_watch.bundle_version(v1)))  # a pod still on v1
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        args = ["unused", "--versions", str(root / "versions"), "--pointer", str(root / "current"), "--url", url]
        assert bundle_watch.main(args) == 0 and v0.is_symlink(), "without --delete it only lists"
        assert bundle_watch.main([*args, "--delete"]) == 0
    finally:
        srv.shutdown()
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["v1", "v2"]
    assert bundle_dir.is_dir(), "the link went, not what it points to"
    # an unreachable worker: exit 2, nothing deleted
    dead = ["unused", "--versions", str(root / "versions"), "--pointer", str(root / "current"),
            "--url", "http://127.0.0.1:9", "--delete"]  # fmt: skip
    assert bundle_watch.main(dead) == 2
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["v1", "v2"]
    assert bundle_watch.main(["unused", "--versions", str(root / "versions")]) == 2  # no --url: refuses
    assert "say which workers" in capsys.readouterr().err


def test_serve_keeps_the_pointer_symlink_for_the_workers(bundle_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """`unimatch serve --bundle /bundles/current` must hand the workers the pointer, not its target
    (resolved, the watcher would watch a directory that never moves)."""
    from service import cli
    from unimatch.cli import build_parser

    root, (v0,) = _versions(tmp_path, bundle_dir)
    bundle_watch.publish(v0, root / "current")
    seen: dict[str, str] = {}
    monkeypatch.setattr(cli, "_run_uvicorn", lambda *a, **k: seen.update(bundle=os.environ["UNIMATCH_BUNDLE"]))
    for name in ("UNIMATCH_BUNDLE", "UNIMATCH_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args(["serve", "--bundle", str(root / "current")])
    assert args.handler(args) == 0
    assert seen["bundle"] == str(root / "current")
