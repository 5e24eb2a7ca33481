"""Write a dataset's user ids, one per line: the id list the Locust workload draws from.

The Locust process (and the stock ``locustio/locust`` image of docker-compose.yml) has no numpy, so it
reads a plain text file: ``python -m loadtests.users --data DATASET --out users.txt``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def export_user_ids(data: Path, out: Path) -> int:
    """Write ``data/users/external_id.npy`` to ``out`` (atomically); returns the number of ids."""
    import numpy as np

    src = Path(data) / "users" / "external_id.npy"
    if not src.is_file():
        raise FileNotFoundError(f"{src} not found: is {data} a dataset directory (unimatch data synth)?")
    ids = np.load(src, mmap_mode="r", allow_pickle=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for i in range(0, ids.shape[0], 65536):
            fh.write("\n".join(str(x) for x in ids[i : i + 65536]))
            fh.write("\n")
    tmp.replace(out)
    return int(ids.shape[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.users", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="dataset directory")
    p.add_argument("--out", type=Path, required=True, help="text file to write, one user id per line")
    args = p.parse_args(argv)
    try:
        n = export_user_ids(args.data, args.out)
    except FileNotFoundError as exc:
        print(f"loadtests.users: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {n:,} user ids to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
