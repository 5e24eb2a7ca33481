"""GPU check of the retrieval engine's scoring design (issue 5, NANN on GPU): one prepared, timed script.

Usage (on the lent GPU machine, from the repository root)::

    python benchmarks/gpu_check.py BUNDLE --out $OUT/gpu_check.json [--seconds 20] [--pairs 17000]

What it measures, in order, and says which path ran:

1. onnxruntime's providers. If ``CUDAExecutionProvider`` is there, the engine itself runs on CUDA
   (``service.engine.MatchEngine``: entity tables resident on the device, gather inside the graph,
   IOBinding, float32 and float16 tables, concurrent requests merged when the export allows it) and
   the script reports single-stream p50/p99 and QPS under thread concurrency, then the batched lockstep
   search (``MatchEngine.match_many``: B requests' beams together, one device call per step) per B.
2. Otherwise (a CPU build of onnxruntime, as on the lent machine) the *same network* runs in PyTorch
   on CUDA: ``benchmarks.torch_scorer.TorchPairScorer`` rebuilds the run's checkpoint (the manifest's
   ``training.run``, or ``--run``) and wraps it in the module the exporter traced to
   ``pair_scorer.onnx`` (``model.export.PairScorerGraph``), entity tables from the bundle resident on
   the device, candidates gathered on the device (``index_select`` inside the scorer call), in
   float32, bfloat16 and float16, and checked against onnxruntime CPU on one request. The script
   reports: (a) scorer latency and pairs/s per batch size; (b) the same with the call captured as a
   CUDA graph per batch bucket (static buffers: what a production GPU scorer does to remove launch
   overhead); (c) end-to-end NANN queries (``service.search`` on the host, every expansion step
   scored on the GPU) single-stream and with concurrent threads: QPS, p50/p99; (d) batching
   concurrent requests: U users' own candidates scored in one call of the batched scorer
   (``model.export.BatchedPairScorerGraph``, users x ``--pairs`` candidates), as queries/s at
   ``--pairs`` pair evaluations per query. Nothing from onnxruntime-gpu is claimed in this mode.

The JSON written to ``--out`` records the device, the path, every number, and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _pct(x: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(x), q)) if x else float("nan")


def _queries(bundle: Any, n: int, seed: int) -> list[Any]:
    from contracts.features import UserFeatures

    rng = np.random.default_rng(seed)
    s = bundle.schema
    out = []
    for _ in range(n):
        seq = np.full(s.max_seq_len, -1, dtype=np.int64)
        h = int(rng.integers(1, s.max_seq_len + 1))
        seq[-h:] = rng.integers(0, bundle.num_entities, h)
        cat = np.array([rng.integers(0, c.cardinality) for c in s.user_categorical], dtype=np.int64)
        out.append(UserFeatures(cat=cat, num=rng.normal(size=len(s.user_numeric)).astype(np.float32), seq=seq))
    return out


def _concurrency(fn: Callable[[int], float], n_queries: int, threads: int) -> dict[str, float]:
    lat: list[float] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        ms = fn(i)
        with lock:
            lat.append(ms)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(one, range(n_queries)))
    wall = time.perf_counter() - t0
    return {"threads": threads, "queries": n_queries, "qps": n_queries / wall, "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99)}


def ort_cuda_path(bundle: Any, args: argparse.Namespace, res: dict[str, Any]) -> None:
    from service.engine import EngineRequest, MatchEngine

    queries = _queries(bundle, args.queries, 0)
    for fp16 in (False, True):
        eng = MatchEngine(bundle, providers=["CUDAExecutionProvider"], fp16_tables=fp16)
        eng.warmup()
        key = f"onnxruntime_cuda_{'fp16' if fp16 else 'fp32'}"
        res[key] = {"scorer": type(eng.scorer).__name__, "provider": eng.provider, "runs": []}
        for threads in args.threads:
            def one(i: int, eng: MatchEngine = eng) -> float:
                return eng.match(queries[i % len(queries)], i % bundle.schema.num_domains, args.k).stats.total_ms

            r = _concurrency(one, args.queries, threads)
            res[key]["runs"].append(r)
            print(f"{key} threads={threads}: {r['qps']:.0f} q/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms")
        # The batched lockstep search: B requests' beams advanced together, one device call per step.
        res[key]["lockstep"] = []
        for batch in args.lockstep_batches:
            reqs = [EngineRequest(user=queries[i % len(queries)], domain=i % bundle.schema.num_domains, k=args.k)
                    for i in range(args.queries)]
            eng.match_many(reqs[:batch])  # warm this batch shape
            t0 = time.perf_counter()
            got = [r for i in range(0, len(reqs), batch) for r in eng.match_many(reqs[i : i + batch])]
            wall = time.perf_counter() - t0
            lat = [g.stats.total_ms for g in got]
            r = {"batch": batch, "queries": len(reqs), "qps": len(reqs) / wall, "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99)}
            res[key]["lockstep"].append(r)
            print(f"{key} lockstep B={batch}: {r['qps']:.0f} q/s, batch p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms")
        eng.close()


def torch_path(bundle: Any, args: argparse.Namespace, res: dict[str, Any]) -> None:
    import torch

    from benchmarks.torch_scorer import CudaGraphScorer, TorchPairScorer
    from service.engine import SearchParams
    from service.scoring.host import HostGatherScorer
    from service.search import VisitedSet, search

    if args.torch_device == "cuda" and not torch.cuda.is_available():
        res["torch"] = {"error": "torch has no CUDA device either: nothing GPU-side to measure"}
        print(res["torch"]["error"])
        return
    dev = torch.device(args.torch_device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        res["device"] = torch.cuda.get_device_name(0)
    host = HostGatherScorer(bundle)  # the user encoder (once per request) stays on onnxruntime CPU
    queries = _queries(bundle, args.queries, 0)
    ctxs = [host.encode(q.cat, q.num, q.seq, i % bundle.schema.num_domains) for i, q in enumerate(queries)]
    rng = np.random.default_rng(1)
    run = Path(args.run or bundle.manifest.get("training", {}).get("run", ""))
    if not (run / "config.json").is_file():
        res["torch"] = {"error": f"run directory {run} not found: pass --run (the bundle's training run)"}
        print(res["torch"]["error"])
        return
    res["torch"] = {"what": "the run's checkpoint rebuilt in PyTorch as model.export.PairScorerGraph (the module traced "
                    "to pair_scorer.onnx) on the device; entity tables from the bundle on the device, index_select "
                    "gather inside each call; user encoder on onnxruntime CPU", "run": str(run)}
    for precision in args.precisions:
        key = precision
        sc = TorchPairScorer(run, bundle.entity_tensors, dev, precision, tile_to=args.tile_to)
        out_rows = sc.num_rows  # rows of the device tables the scorer-only measurements gather from
        out: dict[str, Any] = {"table_rows": out_rows}
        # parity with onnxruntime CPU on one request
        rows = rng.choice(bundle.num_entities, size=min(2048, bundle.num_entities), replace=False).astype(np.int64)
        want = host.score(ctxs[0], rows)
        got = sc.score(sc.user_feeds(ctxs[0].feeds, ctxs[0].domain), rows)
        out["max_abs_diff_vs_onnxruntime_cpu"] = float(np.max(np.abs(got - want)))
        # (a) eager scorer latency per batch size
        user = sc.user_feeds(ctxs[0].feeds, ctxs[0].domain)
        out["eager"] = []
        for b in args.batches:
            b = min(b, bundle.num_entities)
            r = torch.from_numpy(rng.integers(0, out_rows, size=b)).to(dev)
            for _ in range(5):
                sc.score_device(user, r)
            sync()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < args.seconds / 8:
                sc.score_device(user, r)
                n += 1
            sync()
            ms = (time.perf_counter() - t0) * 1e3 / n
            out["eager"].append({"batch": b, "ms_per_call": ms, "pairs_per_s": b / ms * 1e3})
            print(f"torch {key} eager batch {b}: {ms:.3f} ms/call, {b / ms * 1e3 / 1e6:.1f} M pairs/s")
        # (b) CUDA graph of the scorer call per batch bucket, static buffers
        out["cuda_graph"] = []
        for b in args.batches if cuda else []:
            b = min(b, bundle.num_entities)
            try:
                cg = CudaGraphScorer(sc, user, [b])
                sync()
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < args.seconds / 8:
                    cg.replay(b)
                    n += 1
                sync()
                ms = (time.perf_counter() - t0) * 1e3 / n
                del cg
                out["cuda_graph"].append({"batch": b, "ms_per_call": ms, "pairs_per_s": b / ms * 1e3})
                print(f"torch {key} CUDA graph batch {b}: {ms:.3f} ms/call, {b / ms * 1e3 / 1e6:.1f} M pairs/s")
            except Exception as exc:  # capture can fail on host syncs inside the graph; record why
                out["cuda_graph"].append({"batch": b, "error": str(exc).splitlines()[0][:200]})
                print(f"torch {key} CUDA graph batch {b}: failed ({str(exc).splitlines()[0][:120]})")
                break
        # (c) end-to-end NANN queries: host search, GPU scoring
        if bundle.graph is not None:
            params = SearchParams().for_k(args.k)
            local = threading.local()

            def query(i: int, sc: TorchPairScorer = sc, params: SearchParams = params, local: Any = local) -> float:
                t0 = time.perf_counter()
                vis = getattr(local, "v", None)
                if vis is None:
                    vis = local.v = VisitedSet(bundle.num_entities)
                c = ctxs[i % len(ctxs)]
                u = sc.user_feeds(c.feeds, c.domain)
                search(bundle.graph, lambda cand, u=u: sc.score(u, cand), k=args.k, ef=params.ef, steps=params.steps,
                       top_n=params.top_n, visited=vis)
                return (time.perf_counter() - t0) * 1e3

            for _ in range(5):
                query(0)
            out["end_to_end"] = []
            for threads in args.threads:
                r = _concurrency(query, args.queries, threads)
                out["end_to_end"].append(r)
                print(f"torch {key} NANN queries, {threads} threads: {r['qps']:.0f} q/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms")
        # (d) batching concurrent requests: U users x P own candidates in one call of the batched scorer
        out["batched"] = []
        for users in args.users_per_call if sc.batched is not None else []:
            try:
                cs = ctxs[:users]
                stacked = sc.user_feeds({n: np.concatenate([c.feeds[n] for c in cs]) for n in sc.user_output_names},
                                        np.array([c.domain for c in cs]))
                rows = torch.from_numpy(rng.integers(0, out_rows, size=(len(cs), args.pairs))).to(dev)
                sc.score_batched_device(stacked, rows)
                sync()
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < args.seconds / 8:
                    sc.score_batched_device(stacked, rows)
                    n += 1
                sync()
                ms = (time.perf_counter() - t0) * 1e3 / n
                qps = len(cs) / ms * 1e3
                out["batched"].append({"users": len(cs), "pairs_per_user": args.pairs, "ms_per_call": ms,
                                       "equivalent_qps": qps, "pairs_per_s": len(cs) * args.pairs / ms * 1e3})
                print(f"torch {key} batched {len(cs)} users x {args.pairs} pairs: {ms:.2f} ms/call -> {qps:.0f} queries/s of scoring")
            except Exception as exc:
                out["batched"].append({"users": users, "error": str(exc).splitlines()[0][:200]})
                print(f"torch {key} batched {users} users: failed ({str(exc).splitlines()[0][:120]})")
                break
        res["torch"][key] = out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="JSON results")
    ap.add_argument("--seconds", type=float, default=16.0, help="rough time budget per scorer measurement group")
    ap.add_argument("--queries", type=int, default=400, help="queries per concurrency level")
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--pairs", type=int, default=17000, help="pair evaluations per query for the batched bound")
    ap.add_argument("--threads", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1024, 4096, 17000, 65536])
    ap.add_argument("--tile-to", type=int, default=0, help="repeat entity tables to this many rows for the scorer-only runs (e.g. 1300000)")
    ap.add_argument("--torch-device", default="cuda", help="cpu: dry run of the torch path (no CUDA graphs)")
    ap.add_argument("--lockstep-batches", type=lambda s: [int(v) for v in s.split(",")], default=[16, 64, 256],
                    help="batch sizes of the lockstep search (MatchEngine.match_many) on the onnxruntime CUDA path")
    ap.add_argument("--run", type=Path, default=None, help="the bundle's training run (default: the manifest's training.run)")
    ap.add_argument("--precisions", type=lambda s: s.split(","), default=["fp32", "bf16", "fp16"])
    ap.add_argument("--users-per-call", type=lambda s: [int(v) for v in s.split(",")], default=[8, 32])
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from contracts.bundle import load_bundle

    bundle = load_bundle(args.bundle, verify_checksums=False)
    providers = ort.get_available_providers()
    res: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "bundle": str(args.bundle),
        "catalogue_size": bundle.num_entities,
        "method": bundle.manifest.get("method"),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": providers,
        "host": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    print(f"onnxruntime {ort.__version__} providers: {providers}")
    try:
        import torch

        res["torch"] = None
        res["torch_version"] = torch.__version__
        res["torch_cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            res["device"] = torch.cuda.get_device_name(0)
            print(f"torch {torch.__version__}, device {res['device']}")
    except ImportError:
        res["torch_version"] = None
    if "CUDAExecutionProvider" in providers and args.torch_device == "cuda":
        res["path"] = "onnxruntime-cuda"
        ort_cuda_path(bundle, args, res)
    else:
        res["path"] = "torch-cuda (onnxruntime has no CUDA provider here)"
        print("onnxruntime has no CUDA provider: measuring the GPU scoring design through PyTorch on CUDA")
        torch_path(bundle, args, res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(res, indent=2, default=str) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
