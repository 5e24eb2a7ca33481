"""`unimatch index score-space`: a graph space aligned with the scorer (entity vectors + probe-user scores).

Why: the 4-layer HNSW is built in L2 over ``entities/vectors.npy`` ([E_uee, E_aid], the scorer's entity
input), which is right when the scorer is smooth in that space (paper IV-B; NANN's FGSM training asks
for it). A model that learns the real catalogue's structure stops following those neighbourhoods: on
amazon phone/electronic a 1-epoch model needed 3,066-3,271 pairs per query to find 99% of its own
top-200 through the L2 graph. Two entities that the *model* scores alike for many users belong next to
each other in the graph whatever their L2 distance. So each entity is also described by its scores for a
fixed sample of P probe (user, domain) pairs drawn from the training split, standardised per probe user,
and the graph is built over

    [ vectors / mean |vectors| ,  profile / mean |profile| ]      (E, D + P), float32

(each block scaled to unit mean norm, so neither dominates L2). The search itself is unchanged: the beam
still scores every node it reaches with the model; only which nodes are neighbours changes. Measured
(docs/search-benchmark.md, "Fifth session"): 2.3-4.0x fewer pairs at the same calibrated coverage on
amazon phone/electronic's test users, 3-22% more on sport/cloth, where the L2 graph already works: an
option, not the default. The dataset's split is by interaction, so a probe user usually has test
interactions too; the test queries of probe users were 13 of 300 there and the rest alone gave the same
figures (benchmarks/score_space_overlap.py).

Written to ``entities/graph_vectors.npy`` (checksummed) with a ``graph_space`` manifest section;
``entities/vectors.npy`` is never modified. `unimatch index build --space scores --data D` runs this
command first. A graph over this space cannot take live insertions (the overlay inserts by L2 over
``vectors``, service/overlay.py): the engine refuses live changes on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from contracts.bundle import Bundle, load_bundle
from service.bench.search_bench import BenchError, held_out_queries
from service.cpus import cpu_budget
from service.engine import EXHAUSTIVE_CHUNK_CPU
from service.scoring.host import HostGatherScorer

GRAPH_VECTORS_FILE = "entities/graph_vectors.npy"
SPACE_KIND = "vectors+probe-scores"

Progress = Callable[[int, int], None]  # (probe users done, total)


def probe_profiles(bundle: Bundle, data: Path, probe_users: int, *, seed: int = 0, workers: int = 0,
                   progress: Progress | None = None) -> tuple[np.ndarray, int]:
    """(E, P) standardised scores of every entity for P probe (user, domain) pairs of the training split.

    Returns (profiles, P). Each probe user's scores over the whole catalogue are z-scored (the model's
    scale differs per user and domain; the ranking within a user is what the search follows).
    """
    if probe_users < 1:
        raise BenchError(f"--probe-users must be >= 1, got {probe_users}")
    q = held_out_queries(data, bundle, probe_users, seed, split="train", per_domain=True)
    p = len(q.features)
    e = bundle.num_entities
    scorer = HostGatherScorer(bundle)
    rows = np.arange(e, dtype=np.int64)
    out = np.empty((e, p), dtype=np.float32)

    def one(i: int) -> int:
        u = q.features[i]
        ctx = scorer.encode(u.cat, u.num, u.seq, int(q.domains[i]))
        s = np.concatenate([scorer.score(ctx, rows[j : j + EXHAUSTIVE_CHUNK_CPU]) for j in range(0, e, EXHAUSTIVE_CHUNK_CPU)])
        s = s.astype(np.float64)
        out[:, i] = ((s - s.mean()) / (s.std() + 1e-12)).astype(np.float32)
        return i

    done = 0
    with ThreadPoolExecutor(max_workers=workers or cpu_budget().cpus, thread_name_prefix="unimatch-probe") as pool:
        for _ in pool.map(one, range(p)):  # onnxruntime releases the GIL: one probe user per CPU
            done += 1
            if progress is not None:
                progress(done, p)
    return out, p


def score_space_vectors(vectors: np.ndarray, profiles: np.ndarray) -> np.ndarray:
    """[vectors, profiles], each block divided by its mean row norm (so each weighs ~1 in L2)."""
    v = np.asarray(vectors, dtype=np.float32)
    prof = np.asarray(profiles, dtype=np.float32)
    v_norm = float(np.linalg.norm(v, axis=1).mean(dtype=np.float64)) or 1.0
    p_norm = float(np.linalg.norm(prof, axis=1).mean(dtype=np.float64)) or 1.0
    out = np.empty((v.shape[0], v.shape[1] + prof.shape[1]), dtype=np.float32)  # no float64 copies at 1M rows
    np.divide(v, v_norm, out=out[:, : v.shape[1]])
    np.divide(prof, p_norm, out=out[:, v.shape[1] :])
    return out


def write_score_space(bundle_dir: Path, data: Path, *, probe_users: int = 128, seed: int = 0, workers: int = 0,
                      progress: Progress | None = None) -> dict[str, Any]:
    """Compute and write ``entities/graph_vectors.npy`` and the manifest's ``graph_space``: file first,
    manifest last (a crash in between leaves the old manifest, which does not name the new file)."""
    from contracts.io import atomic_write_npy, sha256_file
    from contracts.manifest import read_manifest, write_manifest

    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)
    t0 = time.perf_counter()
    profiles, p = probe_profiles(bundle, data, probe_users, seed=seed, workers=workers, progress=progress)
    vectors = score_space_vectors(np.asarray(bundle.vectors), profiles)
    path = bundle_dir / GRAPH_VECTORS_FILE
    atomic_write_npy(path, vectors)
    path.chmod((bundle_dir / "manifest.json").stat().st_mode & 0o777)
    manifest = read_manifest(bundle_dir)
    manifest.setdefault("files", {})[GRAPH_VECTORS_FILE] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    section = {"file": GRAPH_VECTORS_FILE, "kind": SPACE_KIND, "dim": int(vectors.shape[1]),
               "vector_dim": int(vectors.shape[1] - p), "probe_users": p, "probe_split": "train", "seed": seed,
               "seconds": round(time.perf_counter() - t0, 1)}
    manifest["graph_space"] = section
    write_manifest(bundle_dir, manifest)
    return section
