"""Index build benchmark: build time, peak memory, on-disk size and L2 recall@100 of the 4-layer graph.

The scale targets (paper section IV-B builds a 4-layer HNSW over L2): 1M entities x 64 dims within
5 minutes and 3 GB on 2 cores; 5.56M (the paper's largest entity type, Table II) within 1 hour and 16 GB.

Each (size, library) runs in its own subprocess so that its peak RSS (``ru_maxrss``) is its own. The
vectors are written once per size to ``--work`` and memory-mapped, as a bundle's are.

* ``hnswlib``: the production path, ``index_builder.build.build_index`` on a minimal bundle: build with
  patched mL, cap to 4 layers, parse the saved file, repair, health report (recall over the extracted
  CSR arrays with a Python HNSW search), write the arrays and manifest.
* ``faiss``: ``IndexHNSWFlat`` with the same M / efConstruction and preset levels (same mL, capped at 3),
  recall from faiss's own search with efSearch = the same ef. A comparison column only.

Vectors ("clustered-16"): max(16, N/1000) cluster centres (at most 1000) in a 16-d latent space, each point
a centre plus N(0, 0.5^2) latent noise, mapped to 64-d by a fixed random linear map, plus N(0, 0.1^2)
noise in 64-d: an intrinsic dimension ~16 like learned embeddings, harder than the unit tests' data.
Queries: 200 catalogue vectors plus noise (index_builder.health.sample_queries), exact top-100 by brute force.

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_index.py --sizes 10k,100k,1m --faiss 10k,100k
    # writes docs/index-benchmark.json and docs/index-benchmark.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SIZES = {"10k": 10_000, "100k": 100_000, "1m": 1_000_000, "5.56m": 5_560_000, "10m": 10_000_000}


def clustered_vectors(n: int, dim: int, seed: int = 0, chunk: int = 1 << 18) -> np.ndarray:
    """The "clustered-16" vectors described in the module docstring, generated in chunks."""
    rng = np.random.default_rng(seed)
    latent = 16
    clusters = int(min(1000, max(16, n // 1000)))
    centres = rng.standard_normal((clusters, latent)).astype(np.float32)
    proj = (rng.standard_normal((latent, dim)) / np.sqrt(latent)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        z = centres[rng.integers(0, clusters, b - a)] + 0.5 * rng.standard_normal((b - a, latent), dtype=np.float32)
        out[a:b] = z @ proj + 0.1 * rng.standard_normal((b - a, dim), dtype=np.float32)
    return out


def vectors_file(work: Path, n: int, dim: int) -> Path:
    path = work / f"vectors-{n}x{dim}.npy"
    if not path.exists():
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, clustered_vectors(n, dim), allow_pickle=False)
        os.replace(tmp, path)
    return path


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def cpu_seconds() -> float:
    """User + system CPU time of this process: unlike wall time, not inflated by other jobs on the machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round(usage.ru_utime + usage.ru_stime, 1)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_hnswlib(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from index_builder.build import build_index
    from index_builder.config import IndexConfig

    vec_path = Path(args.vectors)
    vectors = np.load(vec_path, mmap_mode="r")
    n, dim = vectors.shape
    bundle = Path(args.work) / f"bundle-{n}"
    shutil.rmtree(bundle, ignore_errors=True)
    (bundle / "entities").mkdir(parents=True)
    os.link(vec_path, bundle / "entities/vectors.npy")  # same file, no copy
    manifest = {"format_version": 1, "num_entities": n, "vector_space": {"file": "entities/vectors.npy", "dim": dim}}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    cfg = IndexConfig(M=args.M, ef_construction=args.ef_construction, threads=args.threads, health_ef=args.ef)
    t0 = time.perf_counter()
    report = build_index(bundle=bundle, cfg=cfg)
    total = time.perf_counter() - t0
    out = {
        "library": "hnswlib",
        "n": n,
        "dim": dim,
        "build_s": round(total, 1),
        "timings_s": report["timings_s"],
        "cpu_s": cpu_seconds(),
        "peak_rss_bytes": peak_rss_bytes(),
        "graph_bytes": dir_bytes(bundle / "graph"),
        "layers": report["layers"],
        "nodes_per_layer": report["nodes_per_layer"],
        "edges_per_layer": report["edges_per_layer"],
        "levels_before_capping": report["levels_before_capping"],
        "unreachable_before_repair": report["repair"]["unreachable_before"],
        "repair_edges": report["repair"]["edges_added"],
        "all_reachable": report["all_reachable"],
        "l2_recall_at_100": report["l2_recall"],
        "library_l2_recall_at_100": report["library_l2_recall"],
        "overlap_with_library": report["overlap_with_library"],
    }
    shutil.rmtree(bundle, ignore_errors=True)
    return out


def run_faiss(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    import faiss

    from index_builder.health import brute_force_knn, recall, sample_queries
    from index_builder.hnsw import level_multiplier

    vectors = np.load(args.vectors, mmap_mode="r")
    n, dim = vectors.shape
    faiss.omp_set_num_threads(args.threads if args.threads > 0 else os.cpu_count() or 1)
    t0 = time.perf_counter()
    index = faiss.IndexHNSWFlat(dim, args.M)
    index.hnsw.efConstruction = args.ef_construction
    mult = level_multiplier(n, args.M, 4, 16)
    rng = np.random.default_rng(0)
    levels = np.minimum(np.floor(-np.log(rng.random(n)) * mult), 3).astype(np.int32)
    levels[rng.integers(n)] = 3  # the top layer must not be empty
    index.hnsw.levels.resize(0)
    for value in (levels + 1).tolist():  # faiss stores level + 1
        index.hnsw.levels.push_back(value)
    for a in range(0, n, 1 << 18):
        index.add(np.ascontiguousarray(vectors[a : a + (1 << 18)], dtype=np.float32))
    build = time.perf_counter() - t0
    assert index.hnsw.max_level == 3, index.hnsw.max_level
    q = sample_queries(vectors, 200, 0)
    truth = brute_force_knn(vectors, q, 100)
    index.hnsw.efSearch = args.ef
    _, found = index.search(q, 100)
    tmp = Path(args.work) / f"faiss-{n}.index"
    faiss.write_index(index, str(tmp))
    size = tmp.stat().st_size
    tmp.unlink()
    return {
        "library": "faiss",
        "n": n,
        "dim": dim,
        "build_s": round(build, 1),
        "cpu_s": cpu_seconds(),
        "peak_rss_bytes": peak_rss_bytes(),
        "index_file_bytes": size,
        "nodes_per_layer": [int((levels >= layer).sum()) for layer in range(4)],
        "l2_recall_at_100": recall(found.astype(np.int64), truth),
    }


def child(args: argparse.Namespace) -> None:
    result = run_hnswlib(args) if args.one == "hnswlib" else run_faiss(args)
    print("RESULT " + json.dumps(result), flush=True)


def gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def render(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Index build benchmark",
        "",
        "Produced by `benchmarks/bench_index.py` (numbers below are measured, not edited). Command:",
        "",
        f"    {meta['command']}",
        "",
        f"Machine: {meta['machine']}. Run conditions of each row: below the table.",
        f"Vectors: {meta['vectors']}. Params: M={meta['M']}, ef_construction={meta['ef_construction']}, "
        f"threads={meta['threads']}, recall at ef={meta['ef']} over 200 queries vs brute force.",
        "",
        "| library | N x D | build (s) | CPU (s) | peak RSS (GiB) | on disk (MiB) | nodes per layer (0..3) | levels before cap | "
        "unreachable before repair (per layer) | repair edges | L2 recall@100 (extracted) | hnswlib knn_query recall@100 | overlap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['library']} | {r['n']:,} x {meta['dim']} | failed: {r['error']} ||||||||||| |")
            continue
        disk = r.get("graph_bytes", r.get("index_file_bytes", 0)) / 2**20
        if r["library"] == "hnswlib":
            lines.append(
                f"| hnswlib (bundle arrays) | {r['n']:,} x {r['dim']} | {r['build_s']} | {r['cpu_s']} | {gib(r['peak_rss_bytes'])} | "
                f"{disk:.1f} | {r['nodes_per_layer']} | {r['levels_before_capping']} | "
                f"{r['unreachable_before_repair']} | {r['repair_edges']} | {r['l2_recall_at_100']:.4f} | "
                f"{r['library_l2_recall_at_100']:.4f} | {r['overlap_with_library']:.4f} |"
            )
        else:
            lines.append(
                f"| faiss IndexHNSWFlat (preset levels; index file incl. vectors) | {r['n']:,} x {r['dim']} | "
                f"{r['build_s']} | {r['cpu_s']} | {gib(r['peak_rss_bytes'])} | {disk:.1f} | {r['nodes_per_layer']} | 4 (preset) | "
                f"- | - | {r['l2_recall_at_100']:.4f} (faiss search) | - | - |"
            )
    notes: dict[str, list[str]] = {}  # run conditions -> the rows measured under them, in table order
    for r in results:
        if r.get("run_note"):
            notes.setdefault(r["run_note"], []).append(f"{r['n']:,} {r['library']}")
    if notes:
        lines += ["", "Run conditions (each row keeps those of the run that measured it):", ""]
        lines += [f"- {', '.join(rows)}: {note}" for note, rows in notes.items()]
    lines += [
        "",
        "Build (s) is wall-clock time; CPU (s) is the process's user+system time, which other jobs on the "
        "shared cores do not inflate (with 2 threads and the cores to itself, wall time would be roughly CPU/2). "
        "Build (s) for hnswlib is the whole `build_index`: insertion, parsing the saved index file, capping, "
        "repair, health report (brute force + Python search over the extracted arrays) and writing; the split is "
        "in the JSON (`timings_s`). faiss's time is `add` only. On disk: the graph arrays (hnswlib row) without "
        "the vectors, which the bundle already holds; faiss's file includes the vectors.",
        "",
        "## Scale targets",
        "",
    ]
    targets = {1_000_000: (300, 3), 5_560_000: (3600, 16)}
    for r in results:
        if r["library"] != "hnswlib" or r["n"] not in targets or "error" in r:
            continue
        secs, gbs = targets[r["n"]]
        rss = r["peak_rss_bytes"] / 1e9
        verdict = "met" if r["build_s"] <= secs and rss <= gbs else "NOT met"
        lines.append(
            f"- {r['n']:,} x {r['dim']}: target {secs} s and {gbs} GB; measured {r['build_s']} s wall "
            f"({r['cpu_s']} CPU s, threads={meta['threads']}) and {rss:.2f} GB peak RSS: {verdict} on wall time "
            f"as measured on the shared cores."
        )
    missing = [n for n in targets if not any(r["n"] == n and r["library"] == "hnswlib" for r in results)]
    for n in missing:
        lines.append(f"- {n:,}: not measured in this run.")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10k,100k,1m", help=f"comma list of {sorted(SIZES)}")
    p.add_argument("--faiss", default="10k,100k", help="sizes that also get a faiss column ('' = none)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--M", dest="M", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=100)
    p.add_argument("--ef", type=int, default=100, help="search ef for the recall@100 check (>= 100)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-index"))
    p.add_argument("--json", type=Path, default=REPO / "docs/index-benchmark.json")
    p.add_argument("--md", type=Path, default=REPO / "docs/index-benchmark.md")
    p.add_argument("--note", default="2 cores shared with other engineers' jobs running at the same time.")
    p.add_argument(
        "--append", action="store_true", help="merge into the existing --json results (same library and N replaced)"
    )
    p.add_argument("--render", action="store_true", help="only re-render --md from --json (e.g. with a new --note)")
    p.add_argument("--one", choices=["hnswlib", "faiss"], help=argparse.SUPPRESS)
    p.add_argument("--vectors", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        child(args)
        return
    if args.render:
        data = json.loads(args.json.read_text())
        if "--note" in sys.argv:
            data["meta"]["note"] = args.note
        _write(args.json, json.dumps(data, indent=2) + "\n")
        _write(args.md, render(data["results"], data["meta"]) + hand_written(args.md))
        return
    load_before = os.getloadavg()[0]
    args.work.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    faiss_sizes = {s for s in args.faiss.split(",") if s}
    for name in args.sizes.split(","):
        n = SIZES[name]
        vec = vectors_file(args.work, n, args.dim)
        for lib in ["hnswlib"] + (["faiss"] if name in faiss_sizes else []):
            cmd = [sys.executable, __file__, "--one", lib, "--vectors", str(vec), "--work", str(args.work)]
            cmd += ["--M", str(args.M), "--ef-construction", str(args.ef_construction), "--ef", str(args.ef)]
            cmd += ["--threads", str(args.threads)]
            print(f"[{time.strftime('%H:%M:%S')}] {lib} N={n:,} ...", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                results.append({"library": lib, "n": n, "error": err})
                print(f"  failed: {err}", flush=True)
                continue
            r = json.loads(line[len("RESULT ") :])
            results.append(r)
            print(
                f"  build {r['build_s']} s, peak RSS {gib(r['peak_rss_bytes'])} GiB, recall@100 {r['l2_recall_at_100']:.4f}"
            )
        if n >= 1_000_000:
            vec.unlink()  # GBs of /tmp; regenerated deterministically when needed
    meta = {
        "command": "nice -n 10 .venv/bin/python benchmarks/bench_index.py " + shlex.join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python {platform.python_version()}",
        "note": f"{args.note} Load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
        "vectors": "clustered-16 (16-d latent clusters mapped to 64-d plus noise; see the script's docstring)",
        "dim": args.dim,
        "M": args.M,
        "ef_construction": args.ef_construction,
        "threads": args.threads,
        "ef": args.ef,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for r in results:  # this run's rows carry this run's conditions
        r["run_note"] = meta["note"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    if args.append and args.json.exists():
        old = json.loads(args.json.read_text())
        fresh = {(r["library"], r["n"]) for r in results}
        kept = [r for r in old["results"] if (r["library"], r["n"]) not in fresh]
        results = sorted(kept + results, key=lambda r: (r["n"], r["library"] != "hnswlib"))
        meta["command"] = old["meta"]["command"] + "  &&  " + meta["command"]
    _write(args.json, json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    _write(args.md, render(results, meta) + hand_written(args.md))
    print(render(results, meta))


HAND_WRITTEN = "<!-- hand-written below this line: bench_index.py keeps it when it re-renders the page -->"


def hand_written(md: Path) -> str:
    """The part of an existing page below ``HAND_WRITTEN`` (measurements made outside this script)."""
    if not md.exists() or HAND_WRITTEN not in md.read_text():
        return ""
    return "\n" + HAND_WRITTEN + md.read_text().split(HAND_WRITTEN, 1)[1]


def _write(path: Path, text: str) -> None:
    """Atomic: temporary file in the same directory, then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
