"""`make demo`: run the whole UniMatch path on a small synthetic dataset, as far as it exists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNIMATCH = str(ROOT / ".venv" / "bin" / "unimatch")


def run(*args: str) -> None:
    print("+ unimatch", " ".join(args), flush=True)
    subprocess.run([UNIMATCH, *args], check=True)


def main() -> int:
    data = ROOT / "demo" / "data"
    run("data", "synth", "--out", str(data), "--preset", "small", "--seed", "0")
    print("demo: training, export, index, features and serving are not implemented yet (issues 3-6).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
