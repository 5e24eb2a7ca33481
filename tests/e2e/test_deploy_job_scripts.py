"""The shell scripts of the index-build Job and the PyTorchJob, run for real with fake `unimatch` /
`torchrun` on PATH and the volume paths moved under ``tmp_path``.

They own the two properties an SRE's review found missing: every training job writes a new
run directory and never "resumes" a finished one, and a bundle is published by one rename of a symlink
(no moment without ``/bundles/current``), keeping the versions pods may still map.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e import kustomize_lite
from tests.e2e.deploy_helpers import ROOT

FAKE_UNIMATCH = """#!/bin/sh
# export --run RUN --out DIR | index build --bundle DIR ...: leave a trace of what ran
set -e
echo "$@" >> "$FAKE_LOG"
case "$1" in
  export) mkdir -p "$5"; echo "$3" > "$5/from_run" ;;
  index) echo '{"layers": 4}' > "$4/graph_health.json" ;;
esac
"""
FAKE_TORCHRUN = """#!/bin/sh
# torchrun --nproc-per-node=1 --no-python unimatch train ... --out DIR ...: write a finished run
set -e
echo "$@" >> "$FAKE_LOG"
while [ $# -gt 0 ]; do
  if [ "$1" = --out ]; then mkdir -p "$2"; echo '{"steps": 100}' > "$2/run.json"; fi
  shift
done
"""


def _script(kustomization: str, pick: str) -> str:
    for obj in kustomize_lite.render(ROOT / "k8s" / kustomization):
        for ps in kustomize_lite.pod_specs(obj):
            for c in ps["containers"]:
                if c.get("command") == ["/bin/sh", "-ec"] and pick in c["args"][0]:
                    return str(c["args"][0])
    raise AssertionError(f"no shell script with {pick!r} in k8s/{kustomization}")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("unimatch", FAKE_UNIMATCH), ("torchrun", FAKE_TORCHRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "log"), **extra}


def _run(script: str, tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    moved = script.replace("/data/", f"{tmp_path}/data/").replace("/bundles", f"{tmp_path}/bundles")
    return subprocess.run(["/bin/sh", "-ec", moved], env=env, capture_output=True, text=True, timeout=60)


def test_training_job_writes_its_own_run_and_refuses_a_finished_one(tmp_path: Path) -> None:
    script = _script("training", "torchrun")
    (tmp_path / "data/runs").mkdir(parents=True)
    first = _run(script, tmp_path, _env(tmp_path, JOB_NAME="unimatch-train-a", PET_NODE_RANK="0"))
    assert first.returncode == 0, first.stderr
    runs = tmp_path / "data/runs"
    assert (runs / "unimatch-train-a/run.json").is_file()
    assert os.readlink(runs / "latest") == "unimatch-train-a"
    # a worker (node rank 1) of the next job trains but does not move `latest`
    worker = _run(script, tmp_path, _env(tmp_path, JOB_NAME="unimatch-train-b", PET_NODE_RANK="1"))
    assert worker.returncode == 0, worker.stderr
    assert os.readlink(runs / "latest") == "unimatch-train-a"
    # the same name again: refused with a reason, the finished run untouched, torchrun never started
    before = (tmp_path / "log").read_text()
    again = _run(script, tmp_path, _env(tmp_path, JOB_NAME="unimatch-train-a", PET_NODE_RANK="0"))
    assert again.returncode == 2 and "holds a finished run" in again.stderr
    assert (tmp_path / "log").read_text() == before


def _index_build(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return _run(_script("jobs", "index build"), tmp_path, _env(tmp_path))


def test_index_build_publishes_versions_through_one_symlink(tmp_path: Path) -> None:
    runs = tmp_path / "data/runs"
    (runs / "job-a").mkdir(parents=True)
    (runs / "job-a/run.json").write_text("{}")
    (runs / "latest").symlink_to("job-a")
    first = _index_build(tmp_path)
    assert first.returncode == 0, first.stderr
    bundles = tmp_path / "bundles"
    current = os.readlink(bundles / "current")
    assert current.startswith("versions/") and (bundles / current / "graph_health.json").is_file()
    assert (bundles / "current/from_run").read_text().strip() == str(runs / "job-a")
    # the next version: `current` moves, the old version stays for pods still mapping it
    import time

    time.sleep(1.1)  # versions are named by the second
    (runs / "job-b").mkdir()
    (runs / "job-b/run.json").write_text("{}")
    (runs / ".l").symlink_to("job-b")
    (runs / ".l").rename(runs / "latest")
    second = _index_build(tmp_path)
    assert second.returncode == 0, second.stderr
    assert os.readlink(bundles / "current") != current
    assert (bundles / current / "graph_health.json").is_file()
    assert sorted(p.name for p in (bundles / "versions").iterdir()) == sorted(
        [current.split("/")[1], os.readlink(bundles / "current").split("/")[1]]
    )
    assert not (bundles / ".current.new").exists()
    # the pointer the Job swaps is the one the pods serve and watch
    cm = next(o for o in kustomize_lite.render(ROOT / "k8s/overlays/cpu") if o["kind"] == "ConfigMap")
    assert cm["data"]["UNIMATCH_BUNDLE"] == "/bundles/current" and cm["data"]["UNIMATCH_BUNDLE_WATCH"] == "true"


def test_index_build_refuses_an_unfinished_run_and_the_old_layout(tmp_path: Path) -> None:
    runs = tmp_path / "data/runs"
    (runs / "job-a").mkdir(parents=True)
    (runs / "latest").symlink_to("job-a")  # no run.json: training did not finish
    proc = _index_build(tmp_path)
    assert proc.returncode == 2 and "not a finished run" in proc.stderr
    (runs / "job-a/run.json").write_text("{}")
    (tmp_path / "bundles/current").mkdir(parents=True)  # a directory: the layout before versions/
    (tmp_path / "bundles/current/keep").write_text("served")
    proc = _index_build(tmp_path)
    assert proc.returncode == 2 and "old layout" in proc.stderr
    assert (tmp_path / "bundles/current/keep").read_text() == "served"
    assert not (tmp_path / "log").exists(), "nothing was exported"


@pytest.mark.parametrize("kustomization", ["training", "jobs"])
def test_scripts_are_posix_sh(kustomization: str) -> None:
    """`sh -n` parses them (the train image's /bin/sh is dash, not bash)."""
    for obj in kustomize_lite.render(ROOT / "k8s" / kustomization):
        for ps in kustomize_lite.pod_specs(obj):
            for c in ps["containers"]:
                if c.get("command") == ["/bin/sh", "-ec"]:
                    proc = subprocess.run(["/bin/sh", "-n", "-c", c["args"][0]], capture_output=True, text=True)
                    assert proc.returncode == 0, proc.stderr
