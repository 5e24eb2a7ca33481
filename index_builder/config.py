"""Configuration of the HNSW index build (paper section IV-B: "a 4-layer HNSW graph" over L2).

One frozen dataclass, read by ``index_builder.build.build_index`` and filled by ``unimatch index build``.
Names follow the HNSW paper (Malkov & Yashunin, 2018): ``M``, ``ef_construction``, ``ef``, ``mL``.
"""

from __future__ import annotations

from dataclasses import dataclass


class IndexConfigError(ValueError):
    """An index build parameter is out of range."""


@dataclass(frozen=True)
class IndexConfig:
    """Parameters of one graph build; every default is what ``unimatch index build`` uses."""

    # Number of HNSW layers, levels 0 .. layers-1. The paper serves a 4-layer graph.
    layers: int = 4
    # Out-degree bound of the upper layers; layer 0 gets 2*M (the HNSW paper's M0 = 2M). 16 is the
    # paper's recommended value for low/medium intrinsic dimension and keeps 1M x 64 under 5 minutes here.
    M: int = 16
    # Candidate list size during insertion. 100 is what keeps 1M x 64 near the 5-minute target on 2 cores
    # (docs/index-benchmark.md); larger values build proportionally slower for a little more recall.
    ef_construction: int = 100
    # Insertion threads; 0 = all cores. Builds with more than one thread are not byte-reproducible
    # (the order in which threads insert nodes varies), so 1 is the default: same seed -> same graph.
    threads: int = 1
    # Seeds the insertion order (a permutation of the rows) and the health-report query sample.
    # hnswlib's own level generator is seeded by the library and not reachable from Python.
    seed: int = 0
    # Expected size of the top layer is max(top_layer_min, N / M**(layers-1)). The second term is the
    # standard HNSW level distribution; the floor keeps small catalogues from getting an empty top layer.
    top_layer_min: int = 16
    # Repair layers so that every node is reachable from the entry point (extra reverse edges).
    repair: bool = True
    # Store each neighbour list nearest first (L2), so the search can cap the neighbours it expands per
    # node and keep the closest (hnswlib's own order is farthest first plus appended reverse links).
    sort_neighbours: bool = True
    # Health report: number of sampled queries, neighbours compared, and the search's candidate list size.
    health_queries: int = 200
    health_k: int = 100
    health_ef: int = 200

    def __post_init__(self) -> None:
        checks = {
            "layers": (self.layers, 1, 16),
            "M": (self.M, 2, 1024),
            "ef_construction": (self.ef_construction, 1, 1 << 20),
            "threads": (self.threads, 0, 4096),
            "top_layer_min": (self.top_layer_min, 1, 1 << 30),
            "health_queries": (self.health_queries, 0, 1 << 20),
            "health_k": (self.health_k, 1, 1 << 16),
            "health_ef": (self.health_ef, 1, 1 << 20),
        }
        for name, (value, lo, hi) in checks.items():
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise IndexConfigError(f"index config: {name} must be an integer in [{lo}, {hi}], got {value!r}")
        if self.health_ef < self.health_k:
            raise IndexConfigError(f"index config: health_ef ({self.health_ef}) must be >= health_k ({self.health_k})")
        if self.seed < 0:
            raise IndexConfigError(f"index config: seed must be >= 0, got {self.seed}")
