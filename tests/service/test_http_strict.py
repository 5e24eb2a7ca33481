"""HTTP strictness: strict request types, 422s in the documented ErrorResponse shape, an
OpenAPI document that says what the service answers, no paths or hosts in /v1/info without the admin
token, and the slow-client guards (header timeout, connection cap, body timeout)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings, get_settings
from service.errors import EdgeMiddleware, install_error_handlers

GOOD = {"user_id": "user-0007", "domain": "domain_0", "k": 10}


@pytest.fixture(scope="module")
def client(bundle_dir: Path, dataset_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(bundle=bundle_dir, data=dataset_dir, admin_token="tok"))) as c:
        yield c


def _error_schema_validator(openapi: dict):
    import jsonschema

    doc = {"$ref": "#/components/schemas/ErrorResponse", "components": openapi["components"]}
    return jsonschema.Draft202012Validator(doc)


@pytest.mark.parametrize(
    "change",
    [{"k": "10"}, {"k": True}, {"k": 10.0}, {"user_id": 7}, {"domain": ["domain_0"]}, {"deadline_ms": True},
     {"exclude": "e1"}, {"features": {"categorical": {"gender": "1"}}}, {"features": {"numeric": {"age": False}}}],
)
def test_wrong_json_types_are_422_in_the_documented_shape(client: TestClient, change: dict) -> None:
    r = client.post("/match", json={**GOOD, **change})
    assert r.status_code == 422, r.text
    body = r.json()
    _error_schema_validator(client.get("/openapi.json").json()).validate(body)
    assert body["error"]["kind"] == "validation" and body["error"]["detail"]
    assert body["error"]["message"].split(":")[0] in {"k", "user_id", "domain", "deadline_ms", "exclude"} or "features" in body["error"]["message"]


def test_right_types_still_pass(client: TestClient) -> None:
    r = client.post("/match", json={**GOOD, "deadline_ms": 200})  # an int where a float is asked: fine
    assert r.status_code == 200, r.text
    r = client.post("/match/batch", json={"requests": [GOOD, {**GOOD, "k": 3}]})
    assert r.status_code == 200 and [len(x["items"]) for x in r.json()["results"]] == [10, 3]


def test_every_error_answer_matches_error_response(client: TestClient) -> None:
    validator = _error_schema_validator(client.get("/openapi.json").json())
    for r in (
        client.post("/match", content=b"{not json", headers={"content-type": "application/json"}),
        client.post("/match", json={**GOOD, "domain": "nope"}),
        client.post("/match/batch", json={"requests": [{**GOOD, "k": "1"}]}),
        client.post("/admin/reload", json={"bundle": 5}, headers={"Authorization": "Bearer tok"}),
        client.get("/nowhere"),
    ):
        assert r.status_code in (404, 422), r.text
        validator.validate(r.json())


def test_openapi_documents_error_response_and_the_bundle_domains(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    text = json.dumps(doc)
    assert "HTTPValidationError" not in text
    for path in ("/match", "/match/batch", "/admin/reload"):
        ref = doc["paths"][path]["post"]["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse")
    assert doc["components"]["schemas"]["MatchRequest"]["properties"]["domain"]["enum"] == ["domain_0", "domain_1"]


def test_info_hides_paths_and_hosts_without_the_admin_token(client: TestClient, bundle_dir: Path, dataset_dir: Path) -> None:
    anonymous = client.get("/v1/info")
    assert anonymous.status_code == 200
    text = anonymous.text
    assert str(bundle_dir) not in text and str(dataset_dir) not in text and str(Path.home()) not in text
    assert anonymous.json()["bundle_path"] is None and "data" not in anonymous.json()["feature_store"]
    wrong = client.get("/v1/info", headers={"Authorization": "Bearer nope"}).json()
    assert wrong["bundle_path"] is None
    admin = client.get("/v1/info", headers={"Authorization": "Bearer tok"}).json()
    assert admin["bundle_path"] == str(bundle_dir) and admin["feature_store"]["data"] == str(dataset_dir)


def test_info_hides_the_redis_host(bundle_dir: Path) -> None:
    from service.routes.health import _PRIVATE_STORE_KEYS

    settings = Settings(bundle=bundle_dir, redis_url="redis://10.1.2.3:6390/4")
    from service.lifespan import build_store

    store = build_store(settings)
    described = store.describe()
    assert "10.1.2.3" in json.dumps(described)
    assert "10.1.2.3" not in json.dumps({k: v for k, v in described.items() if k not in _PRIVATE_STORE_KEYS})


# ---- slow clients against a real uvicorn with the guarded protocol --------------------------------
def _tiny_app(body_timeout_s: float) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    app.add_middleware(EdgeMiddleware, max_body_bytes=1 << 20, body_timeout_s=body_timeout_s)
    return app


@pytest.fixture
def guarded_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    import uvicorn

    from service.http_guard import GuardedHttpToolsProtocol

    monkeypatch.setenv("UNIMATCH_HEADER_TIMEOUT_S", "0.5")
    monkeypatch.setenv("UNIMATCH_MAX_CONNECTIONS", "3")
    get_settings.cache_clear()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(_tiny_app(0.5), host="127.0.0.1", port=port, http=GuardedHttpToolsProtocol, log_level="warning",
                            timeout_keep_alive=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    assert server.started
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)
        get_settings.cache_clear()


def _closed_by_server(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def _request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(data)
        s.settimeout(5)
        out = b""
        while b"\r\n\r\n" not in out:
            chunk = s.recv(4096)
            if not chunk:
                break
            out += chunk
        return out


def test_idle_and_slowloris_connections_are_closed(guarded_server: int) -> None:
    idle = socket.create_connection(("127.0.0.1", guarded_server))
    slow = socket.create_connection(("127.0.0.1", guarded_server))
    slow.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\n")  # headers never completed
    try:
        assert _closed_by_server(idle, within_s=5) and _closed_by_server(slow, within_s=5)
    finally:
        idle.close()
        slow.close()
    ok = _request(guarded_server, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    assert ok.startswith(b"HTTP/1.1 200")


def test_connections_beyond_the_cap_are_closed_at_once(guarded_server: int) -> None:
    held = [socket.create_connection(("127.0.0.1", guarded_server)) for _ in range(3)]
    extra = socket.create_connection(("127.0.0.1", guarded_server))
    try:
        # the extra one is closed on accept, well before the 0.5 s header timeout of the held ones
        assert _closed_by_server(extra, within_s=0.4)
    finally:
        for s in (*held, extra):
            s.close()


def test_a_body_slower_than_the_body_timeout_gets_408(guarded_server: int) -> None:
    answer = _request(guarded_server, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly-ten!!")
    assert answer.startswith(b"HTTP/1.1 408"), answer


def test_overload_is_shed_at_the_protocol_and_the_connection_stays_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Admission's edge rule answered by the protocol itself: the route never runs, the body is dropped
    unread, and the next request on the same kept-alive connection is served."""
    import types

    import uvicorn

    from service.errors import Overloaded
    from service.http_guard import GuardedHttpToolsProtocol

    refuse = {"on": True}
    calls: list[int] = []

    class FakeAdmission:
        def edge_refuse(self, budget_s: float) -> Overloaded | None:
            return Overloaded("overloaded: test", headers={"Retry-After": "3"}) if refuse["on"] else None

    app = FastAPI()

    @app.post("/match")
    async def match(request: Request) -> dict:
        calls.append(len(await request.body()))
        return {"ok": True}

    app.state.unimatch = types.SimpleNamespace(settings=types.SimpleNamespace(edge_shed=True, deadline_ms=100.0),
                                               admission=FakeAdmission())
    get_settings.cache_clear()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=GuardedHttpToolsProtocol,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(5)
            body = b"{not json at all}"
            sock.sendall(b"POST /match HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            first = sock.recv(65536)
            refuse["on"] = False
            sock.sendall(b"POST /match HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            second = sock.recv(65536)
    finally:
        server.should_exit = True
        thread.join(10)
        get_settings.cache_clear()
    assert first.startswith(b"HTTP/1.1 503") and b"retry-after: 3" in first.lower() and b'"overloaded"' in first
    assert second.startswith(b"HTTP/1.1 200"), second
    assert calls == [2]  # the route ran for the second request only


def test_the_protocol_decides_the_edge_once_and_the_middleware_not_again() -> None:
    """Under the guarded protocol the edge decision is made once per request: the middleware skips a
    request the protocol let through (measured: deciding twice refused the edge's one-per-interval
    pass in the middleware, so a stale estimate refused every request for good)."""
    import types

    import uvicorn

    from service.errors import EdgeMiddleware, Overloaded
    from service.http_guard import GuardedHttpToolsProtocol

    decisions: list[float] = []

    class OnceThenRefuse:
        def edge_refuse(self, budget_s: float) -> Overloaded | None:
            decisions.append(budget_s)
            return None if len(decisions) == 1 else Overloaded("overloaded: test", headers={"Retry-After": "1"})

    app = FastAPI()
    app.add_middleware(EdgeMiddleware, max_body_bytes=1000, body_timeout_s=None)

    @app.post("/match")
    async def match() -> dict:
        return {"ok": True}

    app.state.unimatch = types.SimpleNamespace(settings=types.SimpleNamespace(edge_shed=True, deadline_ms=100.0),
                                               admission=OnceThenRefuse())
    get_settings.cache_clear()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=GuardedHttpToolsProtocol,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(5)
            sock.sendall(b"POST /match HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            first = sock.recv(65536)
    finally:
        server.should_exit = True
        thread.join(10)
        get_settings.cache_clear()
    assert first.startswith(b"HTTP/1.1 200"), first
    assert decisions == [0.1]  # once, at the protocol


def test_a_refusal_at_the_protocol_starts_no_asgi_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 503 of the edge rule is written to the transport: no task per refused request (at 5 x
    capacity those tasks were the loop's work), the kept-alive connection serves the next request, a
    `Connection: close` request is answered and closed, and two refused requests in one write both
    get their answer in order."""
    import types

    import uvicorn

    from service.errors import Overloaded
    from service.http_guard import GuardedHttpToolsProtocol

    refuse = {"on": True}
    tasks: list[str] = []
    real = GuardedHttpToolsProtocol._start_asgi_task

    def counted(self, cycle, app) -> None:  # type: ignore[no-untyped-def]
        tasks.append(cycle.scope["path"])
        real(self, cycle, app)

    monkeypatch.setattr(GuardedHttpToolsProtocol, "_start_asgi_task", counted)

    class FakeAdmission:
        def edge_refuse(self, budget_s: float) -> Overloaded | None:
            return Overloaded("overloaded: test", headers={"Retry-After": "2"}) if refuse["on"] else None

    app = FastAPI()

    @app.post("/match")
    async def match(request: Request) -> dict:
        await request.body()
        return {"ok": True}

    app.state.unimatch = types.SimpleNamespace(settings=types.SimpleNamespace(edge_shed=True, deadline_ms=100.0),
                                               admission=FakeAdmission())
    get_settings.cache_clear()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=GuardedHttpToolsProtocol,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    req = b"POST /match HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"

    def read_answers(sock: socket.socket, n: int) -> bytes:
        out = b""
        while out.count(b"HTTP/1.1 ") < n or not out.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
        return out

    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(5)
            sock.sendall(req + req)  # two refused in one write
            both = read_answers(sock, 2)
            refuse["on"] = False
            sock.sendall(req)
            served = read_answers(sock, 1)
        refuse["on"] = True
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(5)
            sock.sendall(b"POST /match HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
            closing = read_answers(sock, 1)
            closed = sock.recv(1024) == b""
    finally:
        server.should_exit = True
        thread.join(10)
        get_settings.cache_clear()
    assert both.count(b"HTTP/1.1 503 Service Unavailable") == 2 and both.lower().count(b"retry-after: 2") == 2
    assert both.count(b'"overloaded"') == 2
    assert served.startswith(b"HTTP/1.1 200"), served
    assert closing.startswith(b"HTTP/1.1 503") and b"connection: close" in closing.lower() and closed
    assert tasks == ["/match"]  # only the request that was served ran the app
