"""The serving path never imports torch, nor any module of model/ or index_builder/.

Torch is a 1 GB import and a second copy of the model runtime; model/ and index_builder/ are offline
steps the slim serving image does not ship (it copies contracts/ and service/ only).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

OFFLINE = ("torch", "model", "index_builder", "hnswlib")


def _loaded_offline_modules(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter (other tests may import torch legitimately) and list what it
    loaded of the offline packages."""
    probe = code + f"""
bad = sorted(m for m in sys.modules if m.split(".")[0] in {OFFLINE!r})
print("LOADED", ",".join(bad))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("LOADED"))
    return [m for m in line.removeprefix("LOADED").strip().split(",") if m]


def test_serving_imports_no_offline_package(bundle_dir: Path, dataset_dir: Path) -> None:
    code = f"""
import sys
from fastapi.testclient import TestClient
from service.app import create_app
from service.config import Settings
import service.cli, service.features, service.engine, service.bench.cli
from unimatch.cli import build_parser
build_parser(["serve", "--bundle", "x"])  # what `unimatch serve` imports before it starts uvicorn
with TestClient(create_app(Settings(bundle={str(bundle_dir)!r}, data={str(dataset_dir)!r}))) as c:
    r = c.post("/match", json={{"user_id": "user-0001", "domain": "domain_0", "k": 5}})
    assert r.status_code == 200, r.text
    assert len(r.json()["items"]) == 5
"""
    assert _loaded_offline_modules(code) == []


def test_the_probe_sees_an_offline_import() -> None:
    # The check above must be able to fail: the full parser registers model/'s commands.
    loaded = _loaded_offline_modules("import sys\nfrom unimatch.cli import build_parser\nbuild_parser()")
    assert "model.cli" in loaded and "index_builder.cli" in loaded
