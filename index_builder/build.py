"""Build the serving graph of a bundle: validate vectors, build, cap, repair, extract, report, write.

``unimatch index build`` (paper section IV-B: "we use the L2 distance of the items to construct a
4-layer HNSW graph structure") is a thin CLI over :func:`build_index`. Writes follow
docs/bundle-format.md: the graph arrays are staged and renamed into ``BUNDLE/graph/``, then
``graph_health.json``, then ``manifest.json`` gains its ``graph`` section (params and per-file sha256),
all through temporary files and renames, arrays before the manifest that names them.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contracts.checks import check_containment, onnx_files_of, verify_checksums
from contracts.graph import GRAPH_DIR, HEALTH_FILE, Graph, write_graph_arrays
from contracts.io import atomic_directory, atomic_write_json, sha256_file
from contracts.manifest import BundleError, read_manifest, write_manifest
from index_builder.config import IndexConfig
from index_builder.health import recall_report, structure_report
from index_builder.hnsw import (
    IndexBuildError,
    RepairReport,
    build_hnswlib,
    cap_layers,
    layer_reachability,
    level_multiplier,
    read_hnswlib_file,
    repair_reachability,
    sort_neighbours_nearest_first,
)

VECTORS_FILE = "entities/vectors.npy"
# If the random level draw leaves the top layer empty (tiny catalogues), retry with mL scaled by this.
_MULT_RETRY_FACTOR = 1.5
_MULT_RETRIES = 4

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class BuildResult:
    graph: Graph
    report: dict[str, Any]  # the health report (graph_health.json)


def validate_vectors(vectors: np.ndarray, *, name: str = "vectors", chunk: int = 1 << 18) -> None:
    """Reject what would make a meaningless or crashing L2 graph, naming the file/array and the first bad row."""
    if vectors.ndim != 2:
        raise BundleError(f"{name}: expected a 2-d (N, D) array, got shape {vectors.shape}")
    n, dim = vectors.shape
    if n == 0:
        raise BundleError(f"{name}: no vectors (shape {vectors.shape}); nothing to index")
    if dim == 0:
        raise BundleError(f"{name}: vectors have dimension 0")
    if not np.issubdtype(vectors.dtype, np.floating):
        raise BundleError(f"{name}: expected float32 vectors, got dtype {vectors.dtype}")
    for a in range(0, n, chunk):
        block = np.asarray(vectors[a : a + chunk])
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            row = a + int(np.flatnonzero(bad)[0])
            raise BundleError(
                f"{name}: row {row} contains NaN or inf ({int(bad.sum())} bad rows in rows {a}..{a + len(block) - 1})"
            )


def build_graph(
    vectors: np.ndarray, cfg: IndexConfig, *, scratch: Path | None = None, progress: Progress | None = None
) -> BuildResult:
    """Build, cap, repair and check an exactly ``cfg.layers``-layer HNSW graph over raw (N, D) vectors.

    ``scratch`` holds hnswlib's temporary index file (default: a temporary directory under /tmp).
    """
    validate_vectors(vectors)
    if vectors.dtype != np.float32:
        vectors = np.asarray(vectors, dtype=np.float32)
    n = vectors.shape[0]
    timings: dict[str, float] = {}
    repair: RepairReport | None = None

    def stage(name: str) -> None:
        if progress is not None:
            progress(name, 0, 0)  # total 0: an indeterminate step of the progress bar

    work = (
        Path(tempfile.mkdtemp(prefix="hnsw-"))
        if scratch is None
        else Path(tempfile.mkdtemp(prefix=".hnsw-build-", dir=scratch))
    )
    try:
        mult = level_multiplier(n, cfg.M, cfg.layers, cfg.top_layer_min)
        index: Any = None
        for attempt in range(_MULT_RETRIES + 1):
            t0 = time.perf_counter()
            index, path = build_hnswlib(
                vectors,
                cfg,
                work,
                mult=mult,
                progress=None if progress is None else lambda d, t: progress("inserting vectors", d, t),
            )
            timings["insert_s"] = time.perf_counter() - t0
            stage("reading the graph from hnswlib's index file")
            t0 = time.perf_counter()
            raw = read_hnswlib_file(path, n)
            path.unlink()
            timings["extract_s"] = time.perf_counter() - t0
            if raw.header.mult != mult:  # the patched mL must be the one the build used
                raise IndexBuildError(f"hnswlib used mL={raw.header.mult}, expected the patched {mult}")
            if raw.header.max_level >= cfg.layers - 1:
                break
            if attempt == _MULT_RETRIES:
                raise IndexBuildError(
                    f"{n} vectors are too few for {cfg.layers} layers (top level reached: {raw.header.max_level})"
                )
            index = None
            mult *= _MULT_RETRY_FACTOR
        uncapped_levels = int(raw.header.max_level) + 1
        above_top = int(np.count_nonzero(raw.levels > cfg.layers - 1))
        graph = cap_layers(raw, cfg.layers)
        del raw
        stage("repairing reachability")
        t0 = time.perf_counter()
        if cfg.repair:
            graph, repair = repair_reachability(graph, vectors)
        timings["repair_s"] = time.perf_counter() - t0
        if cfg.sort_neighbours:
            stage("sorting neighbour lists nearest first")
            t0 = time.perf_counter()
            graph = sort_neighbours_nearest_first(graph, vectors)
            timings["sort_s"] = time.perf_counter() - t0
        stage("health check: connectivity and L2 recall vs brute force")
        t0 = time.perf_counter()
        reachable = layer_reachability(graph)
        report = structure_report(graph, reachable)
        del reachable
        report.update(
            recall_report(
                graph,
                vectors,
                queries=cfg.health_queries,
                k=cfg.health_k,
                ef=cfg.health_ef,
                seed=cfg.seed,
                library_index=index,
            )
        )
        timings["health_s"] = time.perf_counter() - t0
        index = None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "layers": report.pop("layers"),
        "nodes_per_layer": report.pop("nodes_per_layer"),
        "l2_recall_at_100": report.get("l2_recall") if report.get("k") == 100 else None,
        **report,
        "num_nodes": n,
        "dim": int(vectors.shape[1]),
        "library": "hnswlib",
        "params": {**asdict(cfg), "level_multiplier": mult},
        "levels_before_capping": uncapped_levels,
        "nodes_capped_into_top_layer": above_top,
        "repair": {
            "unreachable_before": None if repair is None else repair.unreachable_before,
            "edges_added": None if repair is None else repair.edges_added,
            "brute_force_links": None if repair is None else repair.fallback_links,
        },
        "timings_s": {key: round(value, 3) for key, value in timings.items()},
    }
    return BuildResult(graph=graph, report=report)


SPACES = ("vectors", "scores")


def load_bundle_vectors(bundle: Path, space_name: str = "vectors") -> tuple[dict[str, Any], np.ndarray]:
    """The manifest and the memory-mapped vectors the graph is built over, checked against each other.

    ``space_name``: "vectors" (``vector_space``: the scorer's entity input, as exported) or "scores"
    (``graph_space``: those vectors beside probe-user score profiles, `unimatch index score-space`).
    """
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: bundle directory does not exist")
    if space_name not in SPACES:
        raise BundleError(f"graph space must be one of {SPACES}, got {space_name!r}")
    manifest = read_manifest(bundle, check_version=False)
    _verify_bundle(bundle, manifest)
    if space_name == "scores" and not manifest.get("graph_space"):
        raise BundleError(f"{bundle}: no score space (run `unimatch index score-space --bundle {bundle} --data DATASET`)")
    space = (manifest.get("graph_space") if space_name == "scores" else manifest.get("vector_space")) or {}
    rel = space.get("file", VECTORS_FILE)
    path = bundle / rel
    if not path.is_file():
        raise BundleError(f"{path}: bundle has no entity vectors to index")
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise BundleError(f"{path}: not a plain .npy array ({exc})") from None
    validate_vectors(vectors, name=str(path))
    n, dim = vectors.shape
    if "dim" in space and space["dim"] != dim:
        raise BundleError(f"{path}: vectors have dimension {dim}, manifest vector_space.dim is {space['dim']}")
    if "num_entities" in manifest and manifest["num_entities"] != n:
        raise BundleError(f"{path}: {n} vectors, manifest num_entities is {manifest['num_entities']}")
    external = bundle / "entities/external_id.npy"
    if external.is_file():
        ids = np.load(external, mmap_mode="r", allow_pickle=False)
        if ids.shape[0] != n:
            raise BundleError(f"{external}: {ids.shape[0]} ids for {n} vectors")
    return manifest, vectors


def _verify_bundle(bundle: Path, manifest: dict[str, Any]) -> None:
    """Refuse a bundle the service would refuse, before minutes of graph building: every path inside it,
    every listed file present with its recorded sha256 (a truncated pair_scorer.onnx exited 0 here before).

    The old graph's files are not checked: this build replaces them.
    """
    without_graph = {k: v for k, v in manifest.items() if k != "graph"}
    verify_checksums(bundle, dict(manifest.get("files") or {}))  # each path is checked to be inside first
    check_containment(bundle, without_graph, onnx_files_of(without_graph))


def build_index(*, bundle: Path, cfg: IndexConfig, progress: Progress | None = None,
                space: str = "vectors") -> dict[str, Any]:
    """Build the graph of ``bundle`` over ``space`` (see ``load_bundle_vectors``) and write it, its health
    report and the manifest's ``graph`` section.

    Returns the health report (also saved as ``BUNDLE/graph_health.json``).
    """
    bundle = Path(bundle)
    manifest, vectors = load_bundle_vectors(bundle, space)
    result = build_graph(vectors, cfg, scratch=bundle, progress=progress)
    # tempfile creates 0700 directories and 0600 files; replicas may run as another user, so the graph
    # gets the modes the bundle already has (entities/ for directories, manifest.json for files).
    dir_mode = (bundle / "entities").stat().st_mode & 0o777 if (bundle / "entities").is_dir() else 0o755
    file_mode = (bundle / "manifest.json").stat().st_mode & 0o777
    with atomic_directory(bundle / GRAPH_DIR) as staging:
        files = write_graph_arrays(result.graph, staging)
        staging.chmod(dir_mode)
    report = result.report
    atomic_write_json(bundle / HEALTH_FILE, report)
    (bundle / HEALTH_FILE).chmod(file_mode)
    files[HEALTH_FILE] = {"sha256": sha256_file(bundle / HEALTH_FILE), "bytes": (bundle / HEALTH_FILE).stat().st_size}
    params = report["params"]
    manifest["graph"] = {
        "library": "hnswlib",
        "layers": cfg.layers,
        "M": cfg.M,
        "ef_construction": cfg.ef_construction,
        "seed": cfg.seed,
        "threads": cfg.threads,
        "level_multiplier": params["level_multiplier"],
        "entry_points": report["entry_points"],
        "num_nodes": report["num_nodes"],
        "space": space,
        "files": files,
    }
    # A calibration measured the old graph; the new one must be calibrated again (the engine would
    # ignore the stale one anyway: its graph fingerprint no longer matches).
    manifest.pop("calibration", None)
    write_manifest(bundle, manifest)
    return report
