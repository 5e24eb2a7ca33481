"""`make demo` checks its port first (scripts/port_free.py, stdlib only) and takes PORT=."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts/port_free.py"), *args], capture_output=True, text=True, timeout=30)


def test_busy_port_is_one_line_and_exit_2() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _run(str(port))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and f"port {port}" in r.stderr and "PORT=" in r.stderr
    assert _run(str(port)).returncode == 0  # free again once nothing listens
    assert _run("not-a-port").returncode == 2


def test_make_demo_checks_the_port_before_installing() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}  # under `make test`
        plan = subprocess.run(["make", "--no-print-directory", "-n", "-B", "demo", f"PORT={port}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=30, env=env).stdout
    lines = [line for line in plan.splitlines() if line.strip()]
    assert "port_free.py" in lines[0] and str(port) in lines[0]  # the first thing make would do
    assert any(f"demo.py --port {port}" in line for line in lines)
