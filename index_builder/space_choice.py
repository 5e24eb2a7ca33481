"""`unimatch index build --space auto`: build the graph over both spaces, keep the one the calibration
finds cheaper.

Which space serves a catalogue better is a property of the trained model, not of the catalogue's size:
on amazon phone/electronic a 1-epoch model's top-k follow L2 over the entity vectors badly and the score
space (service.score_space) needed 2.3-4x fewer pairs at the same calibrated coverage; on sport/cloth
and the synthetic sets it cost 3-22% more (docs/search-benchmark.md, "Fifth session"). No threshold on
the catalogue predicts it, so the build measures it: the calibration of each graph already states, per
(domain, k), the pairs its cheapest point scores at the target coverage (or the exhaustive pairs where
no graph point met it), and the space with fewer pairs wins.

The second graph is built in a hard-linked copy of the bundle beside it (``link_copy``: every file a
link, so no extra disk; every writer in the build replaces files by rename, so the bundle's own files
are never written through a link). The winner's graph files end up in the bundle; the copy is removed.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from contracts.calibration import CALIBRATION_FILE, Calibration
from contracts.graph import GRAPH_DIR, HEALTH_FILE
from contracts.manifest import MANIFEST_FILE

# What a --space scores build writes (beside the files it only reads), moved into the bundle when the
# score space wins. The manifest goes last: until it is replaced the bundle describes the old graph.
SCORE_SPACE_FILE = "entities/graph_vectors.npy"  # = service.score_space.GRAPH_VECTORS_FILE
ADOPTED = (SCORE_SPACE_FILE, HEALTH_FILE, CALIBRATION_FILE)
# The score space must score this much fewer pairs to be kept: the vector space also takes live
# changes, and calibrations are noisy. Two builds of the vector graph of amazon phone/electronic (hnswlib's
# threaded insertion), each calibrated, differed by 1.13-2.28x per (domain, k) point and 1.34x in
# geometric mean, more than this margin; the score space's 2.3-4x on the fifth session's 1-epoch model
# was well beyond it, the 300-step model's 0.97x within it.
SCORES_MUST_BEAT = 0.9


@dataclass(frozen=True)
class PointCost:
    domain: str
    k: int
    vectors: float  # mean pairs per query at the calibrated point
    scores: float
    vectors_mode: str
    scores_mode: str


@dataclass(frozen=True)
class SpaceChoice:
    chosen: str  # "vectors" or "scores"
    ratio: float  # geometric mean over the common (domain, k) points of scores pairs / vectors pairs
    points: tuple[PointCost, ...]

    def summary(self) -> str:
        return (f"graph space: {self.chosen} (the score space scores {self.ratio:.2f}x the pairs of the vector "
                f"space, geometric mean over {len(self.points)} calibrated (domain, k) points; it is kept below "
                f"{SCORES_MUST_BEAT}x)")


def choose_space(vectors: Calibration, scores: Calibration) -> SpaceChoice:
    """The space whose calibrated points score fewer pairs, each (domain, k) counting alike.

    A geometric mean of ratios, not a sum of pairs: a sum would be decided by k=1000 alone. Within
    ``SCORES_MUST_BEAT`` of a tie the vector space is kept: it also takes live changes (the overlay
    inserts by L2 over the vectors), and the two calibrations are noisy.
    """
    points: list[PointCost] = []
    for domain, v_points in vectors.domains.items():
        s_by_k = {p.k: p for p in scores.domains.get(domain, ())}
        for v in v_points:
            s = s_by_k.get(v.k)
            if s is not None and v.pairs > 0 and s.pairs > 0:
                points.append(PointCost(domain, v.k, v.pairs, s.pairs, v.mode, s.mode))
    if not points:
        raise ValueError("the two calibrations share no (domain, k) point: nothing to compare")
    ratio = math.exp(sum(math.log(p.scores / p.vectors) for p in points) / len(points))
    return SpaceChoice(chosen="scores" if ratio < SCORES_MUST_BEAT else "vectors", ratio=ratio, points=tuple(points))


def link_copy(bundle: Path) -> Path:
    """A copy of ``bundle`` beside it whose files are hard links (a real copy where linking fails).

    The name starts with a dot and says what it is; ``remove_copy`` deletes it (all of it is ours).
    """
    bundle = Path(bundle)
    dst = Path(tempfile.mkdtemp(prefix=f".{bundle.name}.space-scores-", dir=bundle.parent))
    for root, _dirs, files in os.walk(bundle):
        rel = Path(root).relative_to(bundle)
        # graph/ too: the score space is computed on the bundle as it loads (its manifest names the graph);
        # the build then swaps the copy's graph/ whole, which unlinks the links, never the files.
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            src, out = Path(root) / name, dst / rel / name
            if src.is_symlink():
                continue  # a bundle holds no links (validation refuses them); never follow one out
            try:
                os.link(src, out)
            except OSError:
                shutil.copy2(src, out)
    return dst


def adopt(copy: Path, bundle: Path) -> None:
    """Move the score-space graph built in ``copy`` into ``bundle``: graph/ swapped whole, files by rename,
    the manifest last."""
    copy, bundle = Path(copy), Path(bundle)
    new_graph, old_graph = copy / GRAPH_DIR, bundle / GRAPH_DIR
    aside = bundle / f".{GRAPH_DIR}.old-{os.getpid()}"
    if old_graph.exists():
        old_graph.rename(aside)
    new_graph.rename(old_graph)
    for rel in ADOPTED:
        if (copy / rel).exists():
            os.replace(copy / rel, bundle / rel)
    os.replace(copy / MANIFEST_FILE, bundle / MANIFEST_FILE)
    shutil.rmtree(aside, ignore_errors=True)


def remove_copy(copy: Path) -> None:
    shutil.rmtree(copy, ignore_errors=True)
