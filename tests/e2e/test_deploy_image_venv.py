"""The serving image's install, reproduced in a fresh virtual environment (no Docker engine here).

Copies exactly what the Dockerfile copies (the .dockerignore whitelist), runs the RUN lines of the
Dockerfile's ``build-serve`` stage (``python -m venv``, dependencies read from pyproject.toml, then
``pip install ".[serve]"``) with /opt/venv pointed at a new venv without system site-packages, and
checks that the image's
commands work there: ``unimatch --help``, ``unimatch serve --help``, no torch installed, and the
image's ENTRYPOINT + CMD serving a small bundle, answered by the HEALTHCHECK command and ``POST /match``.
Needs PyPI (or the local wheel mirror pip is configured with) and takes ~2 min on 2 cores (pip install
alone ~90 s): marked slow and run only with ``UNIMATCH_SLOW_TESTS=1``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.deploy_helpers import ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.environ.get("UNIMATCH_SLOW_TESTS") != "1", reason="slow (~2 min, pip install): UNIMATCH_SLOW_TESTS=1"),
]


def _stage_copies(stage: str) -> list[str]:
    """The sources of a stage's plain ``COPY src dst`` lines (not ``--from``): what its build sees."""
    text = (ROOT / "Dockerfile").read_text()
    body = text[text.index(f"AS {stage}\n") :]
    body = body[: body.index("\nFROM ")] if "\nFROM " in body else body
    out: list[str] = []
    for line in body.splitlines():
        m = re.match(r"COPY\s+(?!--from)(.+)\s+\S+$", line.strip())
        if m:
            out += [src.rstrip("/") for src in m.group(1).split()]
    return out


def _build_context(dst: Path) -> Path:
    """What the ``build-serve`` stage copies, of the paths .dockerignore lets in: the serving image must
    work with those alone (no model/ or index_builder/)."""
    whitelist = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    allowed = [name for name in _stage_copies("build-serve") if name in whitelist]
    assert "model" not in allowed and "index_builder" not in allowed and "contracts" in allowed
    dst.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in allowed:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dst / name)
    return dst


def _stage_runs(stage: str) -> list[str]:
    """The RUN commands (shell form, continuations joined) of one Dockerfile stage."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    body = text[text.index(f"AS {stage}\n") :]
    body = body[: body.index("\nFROM ")] if "\nFROM " in body else body
    return [line.strip()[4:] for line in body.splitlines() if line.strip().startswith("RUN ")]


def _serve_stage_json(instruction: str) -> list[str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stage = text[text.index("AS serve") :]
    line = next(line.strip() for line in stage.splitlines() if line.strip().startswith(instruction))
    return json.loads(line[line.index("[") :])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_install_runs_the_image_commands(tmp_path: Path) -> None:
    ctx = _build_context(tmp_path / "context")
    env_dir = tmp_path / "venv"
    py, bin_dir = env_dir / "bin" / "python", env_dir / "bin"
    # The build-serve stage's RUN lines, in order, with /opt/venv and /tmp pointed into tmp_path.
    runs = _stage_runs("build-serve")
    assert runs[0].startswith("python -m venv") and any('".[serve]"' in r for r in runs)
    # HOME stays: pip reads its user config (a local wheel mirror, where this machine has one) from it.
    shell_env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path))}
    for key in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_CERT", "PIP_CONFIG_FILE", "PIP_DEFAULT_TIMEOUT"):
        if key in os.environ:
            shell_env[key] = os.environ[key]
    t0 = time.perf_counter()
    for run in runs:
        run = run.replace("/tmp/", f"{tmp_path}/").replace("/opt/venv", str(env_dir))  # this order: env_dir is under /tmp
        proc = subprocess.run(["sh", "-c", run], cwd=ctx, env=shell_env, capture_output=True, text=True, timeout=800)
        assert proc.returncode == 0, f"{run}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    print(f"build-serve RUN lines (venv, dependencies, .[serve]): {time.perf_counter() - t0:.1f} s")

    for argv in (["--help"], ["serve", "--help"]):
        proc = subprocess.run([str(bin_dir / "unimatch"), *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    assert "serve" in proc.stdout and "--bundle" in proc.stdout
    no_torch = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('torch'))"], capture_output=True, text=True)
    assert no_torch.stdout.strip() == "None", "torch must not be in the serving install"
    assert subprocess.run([str(py), "-c", "import onnxruntime, fastapi, redis, uvicorn"]).returncode == 0
    offline = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('model'), u.find_spec('index_builder'))"],
                             capture_output=True, text=True, cwd=tmp_path)
    assert offline.stdout.strip() == "None None", "the serving install must not carry the offline packages"

    # The image's ENTRYPOINT + CMD on a small bundle (embedded feature store: no Redis in this test).
    from tests.fixtures.fake_bundle import make_fake_bundle, make_fake_dataset

    bundle = make_fake_bundle(tmp_path / "bundle", num_entities=500)
    data = make_fake_dataset(tmp_path / "data", bundle, num_users=20)
    port = _free_port()
    entry, cmd = _serve_stage_json("ENTRYPOINT"), _serve_stage_json("CMD")
    cmd = [a if a != "8000" else str(port) for a in cmd]
    cmd = [a if a != "0.0.0.0" else "127.0.0.1" for a in cmd]
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "UNIMATCH_BUNDLE": str(bundle), "UNIMATCH_DATA": str(data), "HOME": str(tmp_path)}
    server = subprocess.Popen(
        [str(bin_dir / entry[0]), *entry[1:], *cmd], env=env, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            assert time.monotonic() < deadline, "service not ready in 90 s"
            time.sleep(0.5)
        health = _serve_stage_json("HEALTHCHECK --")  # the serve stage's HEALTHCHECK ... CMD [...]
        health = [a.replace("8000", str(port)) for a in health]
        assert subprocess.run([str(bin_dir / health[0]), *health[1:]], timeout=10).returncode == 0
        user = subprocess.run([str(py), "-c", f"import numpy; print(numpy.load('{data}/users/external_id.npy')[0])"], capture_output=True, text=True).stdout.strip()
        with urllib.request.urlopen(f"{base}/v1/info", timeout=5) as r:
            domain = json.loads(r.read())["domains"][0]
        req = urllib.request.Request(
            f"{base}/match", data=json.dumps({"user_id": user, "domain": domain, "k": 5}).encode(),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as r:
            answer = json.loads(r.read())
        assert len(answer["items"]) == 5 and len({i["entity_id"] for i in answer["items"]}) == 5
        assert re.search(r"unimatch_request_duration_seconds", urllib.request.urlopen(f"{base}/metrics").read().decode())
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_python_of_this_run_matches_the_image() -> None:
    """The venv above is built with this interpreter: it stands for the image only on its Python minor."""
    assert "python:3.11-slim" in (ROOT / "Dockerfile").read_text()
    assert sys.version_info[:2] == (3, 11)
