"""A minimal serving bundle (manifest + entity arrays) from synthetic clustered vectors, for index tests.

Until `unimatch export` writes real bundles, this is the smallest directory that docs/bundle-format.md
allows the index builder to read: manifest.json with "files", entities/vectors.npy, entities/external_id.npy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from contracts.io import sha256_file


def clustered_vectors(n: int, dim: int = 16, *, clusters: int = 32, seed: int = 0) -> np.ndarray:
    """(n, dim) float32: cluster centroids on a 4-d latent subspace plus isotropic noise (seeded)."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((4, dim))
    centroids = rng.standard_normal((clusters, 4)) @ basis
    x = centroids[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim))
    return x.astype(np.float32)


def make_bundle(root: Path, vectors: np.ndarray, *, dim: int | None = None) -> Path:
    """Write a minimal bundle for ``vectors`` under ``root``; ``dim`` overrides the manifest's vector dim."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "entities").mkdir(exist_ok=True)
    np.save(root / "entities/vectors.npy", vectors, allow_pickle=False)
    n = vectors.shape[0] if vectors.ndim else 0
    np.save(root / "entities/external_id.npy", np.array([f"e{i}" for i in range(n)]), allow_pickle=False)
    files = {
        rel: {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}
        for rel in ("entities/vectors.npy", "entities/external_id.npy")
    }
    manifest = {
        "format_version": 1,
        "kind": "two-tower",
        "num_entities": n,
        "vector_space": {
            "file": "entities/vectors.npy",
            "dim": dim if dim is not None else int(vectors.shape[-1]),
            "what": "synthetic test vectors",
        },
        "files": files,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root
