"""Runs the real Locust workload headless for ~5 s against a stub server that answers some requests
wrongly (duplicate entity ids when k=50), through the runner: wrong answers must count as failures."""

from __future__ import annotations

import csv
import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loadtests.run import main


class _Stub(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like uvicorn: no connection churn in the latencies
    def log_message(self, *args: object) -> None:  # keep pytest output quiet
        pass

    def _send(self, obj: object, status: int = 200) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/info":
            self._send({"domains": ["d0", "d1"], "search": {"eligible_per_domain": {"d0": 1000, "d1": 1000}}})
        else:
            self._send({"error": "not found"}, 404)

    def do_POST(self) -> None:
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        k = req["k"]
        ids = [f"e{i}" for i in range(k)]
        if k == 50:
            ids[-1] = ids[0]  # the wrong answer
        items = [{"entity_id": e, "entity_type": "item", "score": float(k - i)} for i, e in enumerate(ids)]
        self._send({"domain": req["domain"], "items": items, "partial": False, "degraded": False, "cold_start": False})


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 drops SYNs under load (1 s retransmits)
    daemon_threads = True


@pytest.fixture()
def stub_url() -> Iterator[str]:
    server = _Server(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.timeout(90)
def test_locust_counts_wrong_answers_as_failures(tmp_path: Path, stub_url: str) -> None:
    users = tmp_path / "users.txt"
    users.write_text("".join(f"u{i}\n" for i in range(100)))
    out = tmp_path / "report"
    rc = main(
        [
            "--host", stub_url, "--users-file", str(users), "--steps", "40", "--step-seconds", "5",
            "--warmup", "1", "--user-rate", "4", "--k-mix", "10:1,50:1", "--out", str(out),
            *(["--locust-cpus", "0"] if shutil.which("taskset") else []),
        ]
    )  # fmt: skip
    assert rc == 0
    (step,) = json.loads((out / "results.json").read_text())["steps"]
    assert step["requests"] > 50, step
    share = step["failures"] / step["requests"]
    assert 0.3 < share < 0.7, step  # half the requests ask k=50, all of those are answered wrongly
    with (out / "raw" / "locust_failures.csv").open() as fh:
        messages = {row["Error"] for row in csv.DictReader(fh)}
    assert any("duplicate entity ids" in m for m in messages), messages
    assert (out / "loadtest.png").stat().st_size > 0
    assert "| 40 | 10 |" in (out / "report.md").read_text()
