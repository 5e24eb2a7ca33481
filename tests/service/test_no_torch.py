"""The serving path never imports torch (a 1 GB import and a second copy of the model runtime)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_serving_imports_no_torch(bundle_dir: Path, dataset_dir: Path) -> None:
    # A fresh interpreter: other tests in this process may have imported torch legitimately.
    code = f"""
import sys
from fastapi.testclient import TestClient
from service.app import create_app
from service.config import Settings
import service.cli, service.features, service.engine
from unimatch.cli import build_parser
build_parser()  # what `unimatch serve` imports before it starts uvicorn
with TestClient(create_app(Settings(bundle={str(bundle_dir)!r}, data={str(dataset_dir)!r}))) as c:
    r = c.post("/match", json={{"user_id": "user-0001", "domain": "domain_0", "k": 5}})
    assert r.status_code == 200, r.text
    assert len(r.json()["items"]) == 5
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("TORCH" if bad else "CLEAN", bad[:5])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "CLEAN" in out.stdout, out.stdout
