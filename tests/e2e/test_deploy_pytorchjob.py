"""The PyTorchJob's container command, run the way the Kubeflow training operator runs it (no cluster here).

Two local "nodes": two ``torchrun`` processes with the PET_* variables the operator injects
(PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT) and the manifest's own command and
arguments, on a tiny synthetic dataset with ``--max-steps`` instead of the manifest's epochs. Both
ranks must exit 0 and the run must record world size 2. Slow (two torch processes on shared cores):
runs only with ``UNIMATCH_SLOW_TESTS=1``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e import kustomize_lite
from tests.e2e.deploy_helpers import ROOT, torchrun_argv

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.environ.get("UNIMATCH_SLOW_TESTS") != "1", reason="slow (two torch processes): UNIMATCH_SLOW_TESTS=1"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _swap(args: list[str], flag: str, value: str) -> list[str]:
    i = args.index(flag)
    return [*args[: i + 1], value, *args[i + 2 :]]


def test_pytorchjob_command_trains_with_two_nodes(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    if shutil.which("torchrun", path=str(bin_dir)) is None:
        pytest.skip("torch (the train extra) is not installed")
    data, run = tmp_path / "data", tmp_path / "run"
    subprocess.run([str(bin_dir / "unimatch"), "data", "synth", "--out", str(data), "--preset", "tiny"], check=True, timeout=300)

    (job,) = kustomize_lite.render(ROOT / "k8s/training")
    (container,) = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    argv = torchrun_argv(container)  # the torchrun line of the container's script
    args = _swap(_swap(argv[1:], "--data", str(data)), "--out", str(run))
    i = args.index("--epochs")
    args = [*args[:i], "--max-steps", "2", "--no-progress", *args[i + 2 :]]
    command = [str(bin_dir / argv[0]), *args]
    port = str(_free_port())
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            command,
            env={**env, "PET_NNODES": "2", "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": port},
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=800)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{out[-3000:]}"
    summary = json.loads((run / "run.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
