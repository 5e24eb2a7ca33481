"""Random row gathers from a bundle's first entity table: its memory map, anonymous 4 KiB pages, huge pages.

Each batch of 220 random rows is gathered with ``ndarray.take`` after 64 MB are touched (the caches
evicted, as an onnxruntime call between two search steps does); thread CPU ns per row, median of 200
batches. What ``service.hugepages`` rests on (docs/search-benchmark.md, "Seventh session").

Usage::

    .venv/bin/python benchmarks/gather_tlb.py --bundle /work/art/synth1m/bundle
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from contracts.bundle import load_bundle
from service.hugepages import huge_copy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--rows", type=int, default=220, help="rows per batch (a search step's fresh rows)")
    args = p.parse_args()
    name, table = next(iter(load_bundle(args.bundle).entity_tensors.items()))
    t = np.asarray(table)
    tables = {"memory map": t, "anonymous, 4 KiB pages": np.array(t), "anonymous, huge pages": huge_copy(t)}
    evict = np.ones(64 << 20, dtype=np.uint8)
    rng = np.random.default_rng(0)
    res: dict[str, list[int]] = {k: [] for k in tables}
    for _ in range(200):
        rows = rng.integers(0, t.shape[0], args.rows)
        for k, a in tables.items():
            evict[::64] += 1
            t0 = time.thread_time_ns()
            a.take(rows, axis=0)
            res[k].append(time.thread_time_ns() - t0)
    print(f"{name} {t.shape} {t.dtype}, {t[:1].nbytes} bytes a row")
    for k, v in res.items():
        print(f"{k}: {np.median(v) / args.rows:.0f} ns/row")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as exc:  # a bad bundle (BundleError is a ValueError): one line
        print(f"{Path(__file__).stem}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
