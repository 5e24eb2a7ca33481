"""scripts/compose-check without Docker: it explains itself and refuses a machine it cannot use.

The real run needs a Docker engine (not in CI); docs/deploy.md holds its last output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.e2e.deploy_helpers import ROOT

SCRIPT = ROOT / "scripts/compose-check"


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=env)


def test_help_lists_the_steps() -> None:
    proc = _run("--help", env=dict(os.environ))
    assert proc.returncode == 0
    for word in ("--base", "--port", "--keep", "Locust"):
        assert word in proc.stdout


def test_no_docker_is_a_one_line_exit_2(tmp_path: Path) -> None:
    """No docker CLI on PATH: exit 2 and one line, before anything is built or written."""
    (tmp_path / "bin").mkdir()
    env = {"PATH": str(tmp_path / "bin"), "HOME": str(tmp_path)}
    proc = _run(env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "docker" in proc.stderr and "Traceback" not in proc.stderr


def test_unreachable_daemon_is_exit_2(tmp_path: Path) -> None:
    """A docker CLI whose daemon does not answer (a fake CLI that fails `docker info`)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "docker"
    fake.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    fake.chmod(0o755)
    proc = _run(env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 2 and "daemon does not answer" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_arguments_exit_2() -> None:
    proc = _run("--port", "0", env=dict(os.environ))
    assert proc.returncode == 2 and "--port" in proc.stderr
