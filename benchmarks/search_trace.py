"""Why the beam misses part of the model's top-k: a per-layer trace of the NANN search against the truth.

For held-out (user, domain) queries it runs the engine's search layer by layer (the same
``entry`` / ``search_layer`` calls as ``service.search.search``) and, against the exhaustive top-k of
the same model, reports:

* per layer: how many of the top-k the layer's visited set S scored, and how many its beam W holds;
* for the top-k the search missed: their layer-0 hop distance to the nearest scored node (1 = a
  neighbour of something scored: the beam stopped next to it; large = another region of the graph),
  and whether they are within one hop of the user's own history (what history seeding reaches);
* how many separate regions the top-k occupy: connected components of the layer-0 graph restricted to
  the top-k and their direct neighbours (one region = a beam can walk it; many = one beam cannot).

    python -m benchmarks.search_trace --bundle B --data D --k 200 --queries 100 --md docs/x.md

Prints a table and optionally writes markdown/JSON. Not a test: a measurement.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np


def _hops(graph: Any, sources: np.ndarray, targets: np.ndarray, max_hops: int = 4) -> np.ndarray:
    """Layer-0 BFS distance from ``sources`` to each of ``targets`` (max_hops + 1 = farther)."""
    from service.search import expand

    n = graph.num_nodes
    dist = np.full(n, max_hops + 1, dtype=np.int64)
    frontier = np.unique(sources)
    dist[frontier] = 0
    for h in range(1, max_hops + 1):
        if frontier.size == 0:
            break
        nb = np.unique(expand(graph, 0, frontier))
        nb = nb[dist[nb] > h]
        dist[nb] = h
        frontier = nb
    return dist[targets]


def _regions(graph: Any, rows: np.ndarray) -> int:
    """Connected components among ``rows`` when two of them are linked by an edge or share a neighbour."""
    from service.search import expand

    rows = np.unique(rows)
    index = {int(r): i for i, r in enumerate(rows)}
    parent = list(range(rows.size))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for r in rows:
        i = index[int(r)]
        for nb in expand(graph, 0, np.array([r], dtype=np.int64)).tolist() + [int(r)]:
            j = index.get(nb)
            if j is not None:
                parent[find(i)] = find(j)
            o = owner.setdefault(nb, i)
            parent[find(i)] = find(o)
    return len({find(i) for i in range(rows.size)})


def trace(bundle_dir: Path, data: Path, *, k: int, queries: int, seed: int, split: str = "test",
          overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from contracts.bundle import load_bundle
    from service.bench.search_bench import held_out_queries
    from service.engine import MatchEngine, SearchParams, _TimedScore
    from service.search import VisitedSet, best_first, entry, search_layer

    bundle = load_bundle(bundle_dir)
    graph = bundle.graph
    if graph is None:
        raise SystemExit(f"{bundle_dir}: no graph")
    engine = MatchEngine(bundle, params=SearchParams(), use_calibration=False, providers=["CPUExecutionProvider"])
    q = held_out_queries(data, bundle, queries, seed, split=split)
    from dataclasses import replace

    p = replace(engine.params, **(overrides or {})).for_k(k)
    nl = graph.num_layers
    per_layer_s = np.zeros(nl)
    per_layer_w = np.zeros(nl)
    found, hop_hist, near_hist, regions, pairs = [], np.zeros(6), [], [], []
    for u, d in zip(q.features, q.domains, strict=True):
        d = int(d)
        exact = engine.match(u, d, k, mode="exhaustive").rows
        ctx = engine.scorer.encode(u.cat, u.num, u.seq, d)
        score = _TimedScore(engine.scorer, ctx)
        visited = VisitedSet(bundle.num_entities)
        visited.new_request()
        ep = entry(graph, whole_top_layer_up_to=p.whole_top_layer_up_to)
        keep = engine._keep_fn(d, None, None)
        results, scored = [], []
        for i, layer in enumerate(range(nl - 1, -1, -1)):
            if layer == 0 and p.seed_history:
                ep = np.concatenate([ep, engine._seeds(u)])
            w, _, s_rows, s_scores, _, _ = search_layer(graph, layer, ep, ef=p.ef[i], steps=p.steps[i], score=score,
                                                        visited=visited, max_degree=0,
                                                        prefer=keep if p.filter_beam and layer == 0 else None)
            per_layer_s[i] += np.isin(exact, s_rows).sum() / k
            per_layer_w[i] += np.isin(exact, w).sum() / k
            scored.append(s_rows)
            ok = keep(s_rows)
            results.append(best_first(s_rows[ok], s_scores[ok], p.top_n[i]))
            ep = w
        got = np.unique(np.concatenate([r for r, _ in results]))
        hit = np.isin(exact, got)
        found.append(hit.mean())
        pairs.append(score.pairs)
        missed = exact[~hit]
        if missed.size:
            h = _hops(graph, np.unique(np.concatenate(scored)), missed)
            hop_hist += np.bincount(np.minimum(h, 5), minlength=6)[:6]
            hist = u.seq[u.seq >= 0]
            near_hist.append(float((_hops(graph, hist, missed, 1) <= 1).mean()) if hist.size else 0.0)
        regions.append(_regions(graph, exact))
    nq = len(found)
    return {
        "bundle": str(bundle_dir), "data": str(data), "k": k, "queries": nq, "catalogue": bundle.num_entities,
        "method": bundle.manifest.get("method"),
        "params": {"ef": list(p.ef), "steps": list(p.steps), "filter_beam": p.filter_beam, "seed_history": p.seed_history},
        "coverage": float(np.mean(found)), "pairs": float(np.mean(pairs)),
        "per_layer": [{"layer": nl - 1 - i, "topk_scored": per_layer_s[i] / nq, "topk_in_beam": per_layer_w[i] / nq}
                      for i in range(nl)],
        "missed_hops": {("5+" if h == 5 else str(h)): float(hop_hist[h] / max(hop_hist.sum(), 1)) for h in range(1, 6)},
        "missed_within_1_hop_of_history": float(np.mean(near_hist)) if near_hist else float("nan"),
        "topk_regions_mean": float(np.mean(regions)), "topk_regions_p90": float(np.percentile(regions, 90)),
    }


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| dataset | catalogue | k | beam | coverage | pairs | top-k scored per layer (top first) | top-k in each layer's beam | "
             "missed: hops to nearest scored node (1 / 2 / 3 / 4 / 5+) | missed within 1 hop of history | top-k regions mean / p90 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {Path(r['data']).name} | {r['catalogue']:,} | {r['k']} | "
            f"{'filtered' if r['params']['filter_beam'] else 'plain'}{' + history' if r['params']['seed_history'] else ''} | "
            f"{r['coverage']:.4f} | {r['pairs']:.0f} | "
            + " / ".join(f"{x['topk_scored']:.3f}" for x in r["per_layer"]) + " | "
            + " / ".join(f"{x['topk_in_beam']:.3f}" for x in r["per_layer"]) + " | "
            + " / ".join(f"{v:.2f}" for v in r["missed_hops"].values()) + " | "
            + f"{r['missed_within_1_hop_of_history']:.2f} | {r['topk_regions_mean']:.1f} / {r['topk_regions_p90']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, action="append", required=True, help="bundle (repeat, with --data each)")
    ap.add_argument("--data", type=Path, action="append", required=True, help="its dataset")
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="sets", action="append", default=None,
                    help="JSON SearchParams overrides, one trace per value (default: '{\"filter_beam\": false}' and '{}')")
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if len(args.bundle) != len(args.data):
        ap.error("give one --data per --bundle")
    sets = [json.loads(t) for t in (args.sets or ['{"filter_beam": false}', "{}"])]
    rows = [trace(b, d, k=args.k, queries=args.queries, seed=args.seed, overrides=o)
            for b, d in zip(args.bundle, args.data, strict=True) for o in sets]
    text = render(rows)
    print(text)
    if args.md:
        args.md.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
