"""GPU check of the retrieval engine's scoring design (issue 5, NANN on GPU): one prepared, timed script.

Usage (on the lent GPU machine, from the repository root)::

    python benchmarks/gpu_check.py BUNDLE --out $OUT/gpu_check.json [--seconds 20] [--pairs 17000]

What it measures, in order, and says which path ran:

1. onnxruntime's providers. If ``CUDAExecutionProvider`` is there, the engine itself runs on CUDA
   (``service.engine.MatchEngine``: entity tables resident on the device, gather inside the graph,
   IOBinding, float32 and float16 tables, concurrent requests merged when the export allows it) and
   the script reports single-stream p50/p99 and QPS under thread concurrency, then the batched lockstep
   search (``MatchEngine.match_many``: B requests' beams together, one device call per step) per B.
2. Otherwise (a CPU build of onnxruntime, as on the lent machine) the *same* exported
   ``pair_scorer.onnx`` is executed by a small ONNX-to-PyTorch interpreter on CUDA — entity tables on
   the device, candidates gathered on the device (``index_select`` inside the scorer call), float32 and
   float16 — and the script reports: (a) scorer latency and pairs/s per batch size; (b) the same with
   the call captured as a CUDA graph (static buffers: what a production GPU scorer does to remove
   launch overhead); (c) end-to-end NANN queries (``service.search`` on the host, every expansion step
   scored on the GPU) single-stream and with concurrent threads: QPS, p50/p99; (d) an upper bound for
   batching concurrent requests: U users' candidates scored in one call through ``torch.vmap``
   (users x ``--pairs`` candidates), as queries/s at ``--pairs`` pair evaluations per query.
   Nothing from onnxruntime-gpu is claimed in this mode.

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


# ---------------------------------------------------------------------------------------------------
# A minimal ONNX interpreter in PyTorch, for the op set our exporters emit (checked on load).
# ---------------------------------------------------------------------------------------------------
class OnnxTorch:
    """Executes an ONNX graph with torch ops. int64 constants stay on the CPU (shape arguments)."""

    OPS = {
        "Add", "Sub", "Mul", "Div", "MatMul", "Gemm", "Relu", "Sigmoid", "Tanh", "Erf", "Softmax", "Concat",
        "Constant", "Gather", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Slice", "Cast", "Shape", "Expand",
        "ReduceSum", "ReduceMean", "Max", "Min", "Clip", "GreaterOrEqual", "Flatten", "LayerNormalization",
        "Where", "Sqrt", "Pow", "Neg", "Equal", "Not", "Identity",
    }

    def __init__(self, model_path: str, device: Any, dtype: Any) -> None:
        import onnx
        import torch
        from onnx import numpy_helper

        self.torch = torch
        self.model = onnx.load(model_path)
        unknown = sorted({n.op_type for n in self.model.graph.node} - self.OPS)
        if unknown:
            raise NotImplementedError(f"ops not supported by the interpreter: {unknown}")
        self.device, self.dtype = device, dtype
        self.consts: dict[str, Any] = {}
        for init in self.model.graph.initializer:
            self.consts[init.name] = self._tensor(numpy_helper.to_array(init))
        self.nodes = []
        for n in self.model.graph.node:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            if n.op_type == "Constant":
                self.consts[n.output[0]] = self._tensor(numpy_helper.to_array(attrs["value"]))
                continue
            self.nodes.append((n.op_type, list(n.input), list(n.output), attrs))
        self.input_names = [i.name for i in self.model.graph.input if i.name not in self.consts]
        self.output_names = [o.name for o in self.model.graph.output]

    def _tensor(self, a: np.ndarray) -> Any:
        t = self.torch.from_numpy(np.array(a))
        if t.is_floating_point():
            if self.dtype == self.torch.float16:  # masking constants like -1e9 would become -inf, then NaN
                t = t.clamp(-6.0e4, 6.0e4)
            return t.to(self.device, self.dtype)
        return t  # integer constants: shapes, axes, indices; moved to the device when used as data

    def _dev(self, t: Any) -> Any:
        return t if t.device == self.device or t.device.type == self.device.type else t.to(self.device)

    def __call__(self, feeds: dict[str, Any]) -> list[Any]:
        torch = self.torch
        env = dict(self.consts)
        env.update(feeds)
        for op, ins, outs, at in self.nodes:
            x = [env[i] if i else None for i in ins]
            if op in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "GreaterOrEqual", "Equal"):
                a, b = x[0], x[1]
                if a.is_floating_point() or b.is_floating_point() or a.device.type != b.device.type:
                    a, b = self._dev(a), self._dev(b)
                f = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div, "Max": torch.maximum,
                     "Min": torch.minimum, "Pow": torch.pow, "GreaterOrEqual": torch.ge, "Equal": torch.eq}[op]
                y = f(a, b)
            elif op == "MatMul":
                y = torch.matmul(self._dev(x[0]), self._dev(x[1]))
            elif op == "Gemm":
                a, b = self._dev(x[0]), self._dev(x[1])
                a = a.t() if at.get("transA") else a
                b = b.t() if at.get("transB") else b
                y = at.get("alpha", 1.0) * (a @ b)
                if len(x) > 2 and x[2] is not None:
                    y = y + at.get("beta", 1.0) * self._dev(x[2])
            elif op == "Relu":
                y = torch.relu(x[0])
            elif op == "Sigmoid":
                y = torch.sigmoid(x[0])
            elif op == "Tanh":
                y = torch.tanh(x[0])
            elif op == "Erf":
                y = torch.erf(x[0])
            elif op == "Sqrt":
                y = torch.sqrt(x[0])
            elif op == "Neg":
                y = -x[0]
            elif op == "Not":
                y = ~x[0]
            elif op == "Identity":
                y = x[0]
            elif op == "Softmax":
                y = torch.softmax(x[0], dim=at.get("axis", -1))
            elif op == "Concat":
                parts = [self._dev(t) if any(p.is_floating_point() for p in x) else t for t in x]
                y = torch.cat(parts, dim=at["axis"])
            elif op == "Gather":
                data, idx = x[0], x[1]
                idx = idx.to(data.device) if idx.device != data.device else idx
                axis = at.get("axis", 0)
                if idx.dim() == 0:
                    y = data.select(axis, int(idx))
                else:
                    y = torch.index_select(data, axis, idx.reshape(-1)).reshape(
                        *data.shape[:axis], *idx.shape, *data.shape[axis + 1 :]
                    )
            elif op == "Reshape":
                shape = [int(s) for s in x[1].tolist()]
                shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
                y = x[0].reshape(shape)
            elif op == "Transpose":
                perm = at.get("perm", list(range(x[0].dim()))[::-1])
                y = x[0].permute(*perm)
            elif op == "Unsqueeze":
                y = x[0]
                for ax in sorted(int(a) for a in x[1].tolist()):
                    y = y.unsqueeze(ax if ax >= 0 else ax + y.dim() + 1)
            elif op == "Squeeze":
                axes = sorted((int(a) % x[0].dim() for a in x[1].tolist()), reverse=True) if len(x) > 1 else None
                y = x[0]
                if axes is None:
                    y = y.squeeze()
                else:
                    for ax in axes:
                        y = y.squeeze(ax)
            elif op == "Slice":
                starts, ends = x[1].tolist(), x[2].tolist()
                axes = x[3].tolist() if len(x) > 3 and x[3] is not None else list(range(len(starts)))
                steps = x[4].tolist() if len(x) > 4 and x[4] is not None else [1] * len(starts)
                index = [slice(None)] * x[0].dim()
                for s_, e_, ax, st in zip(starts, ends, axes, steps, strict=True):
                    index[ax] = slice(int(s_), int(e_), int(st))  # python slicing clamps like ONNX (st > 0)
                y = x[0][tuple(index)]
            elif op == "Cast":
                to = at["to"]
                y = x[0].to(self.dtype) if to in (1, 10, 11) else x[0].to(torch.int64) if to in (6, 7) else x[0].to(torch.bool)
            elif op == "Shape":
                y = torch.tensor(list(x[0].shape), dtype=torch.int64)
            elif op == "Expand":
                shape = [int(s) for s in x[1].tolist()]
                y = x[0].expand(*torch.broadcast_shapes(tuple(x[0].shape), tuple(shape)))
            elif op in ("ReduceSum", "ReduceMean"):
                axes = [int(a) for a in x[1].tolist()] if len(x) > 1 and x[1] is not None else at.get("axes")
                f = torch.sum if op == "ReduceSum" else torch.mean
                y = f(x[0], dim=axes, keepdim=bool(at.get("keepdims", 1)))
            elif op == "Clip":
                lo = x[1] if len(x) > 1 and x[1] is not None else None
                hi = x[2] if len(x) > 2 and x[2] is not None else None
                y = torch.clamp(x[0], min=None if lo is None else lo.item(), max=None if hi is None else hi.item())
            elif op == "Flatten":
                ax = at.get("axis", 1)
                y = x[0].reshape(int(np.prod(x[0].shape[:ax])), -1)
            elif op == "LayerNormalization":
                ax = at.get("axis", -1)
                shape = x[0].shape[ax:]
                y = torch.nn.functional.layer_norm(x[0], shape, self._dev(x[1]), None if len(x) < 3 else self._dev(x[2]), at.get("epsilon", 1e-5))
            elif op == "Where":
                y = torch.where(self._dev(x[0]), self._dev(x[1]), self._dev(x[2]))
            else:  # unreachable: checked in __init__
                raise NotImplementedError(op)
            env[outs[0]] = y
        return [env[o] for o in self.output_names]


class TorchPairScorer:
    """The bundle's pair scorer on a torch device: tables resident, gather on the device, one call per step."""

    def __init__(self, bundle: Any, device: Any, *, fp16: bool, tile_to: int = 0) -> None:
        import torch

        self.torch = torch
        self.bundle = bundle
        self.device = device
        self.dtype = torch.float16 if fp16 else torch.float32
        self.graph = OnnxTorch(str(bundle.path / "pair_scorer.onnx"), device, self.dtype)
        self.tables = {n: torch.from_numpy(np.array(a)).to(device, self.dtype) for n, a in bundle.entity_tensors.items()}
        if tile_to > bundle.num_entities:  # a larger catalogue's device tables (rows repeated), for gather cost at scale
            reps = -(-tile_to // bundle.num_entities)
            self.tables = {n: t.repeat(reps, *([1] * (t.dim() - 1)))[:tile_to].contiguous() for n, t in self.tables.items()}
        self.num_rows = next(iter(self.tables.values())).shape[0]
        self.user_outputs = list(bundle.manifest["user_outputs"])
        self.has_domain = "domain" in self.graph.input_names

    def user_feeds(self, ctx: Any) -> dict[str, Any]:
        t = self.torch
        feeds = {n: t.from_numpy(ctx.feeds[n]).to(self.device, self.dtype) for n in self.user_outputs if n in self.graph.input_names}
        if self.has_domain:
            feeds["domain"] = t.tensor([ctx.domain], dtype=t.int64, device=self.device)
        return feeds

    def score_device(self, user: dict[str, Any], rows: Any) -> Any:
        feeds = dict(user)
        for n, table in self.tables.items():
            feeds[n] = self.torch.index_select(table, 0, rows)
        return self.graph(feeds)[0]

    def score(self, user: dict[str, Any], rows: np.ndarray) -> np.ndarray:
        r = self.torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(self.device, non_blocking=True)
        return self.score_device(user, r).float().cpu().numpy()


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
    res["torch"] = {"what": "pair_scorer.onnx executed by an ONNX->PyTorch interpreter on CUDA; entity tables on the "
                    "device, index_select gather inside each call; user encoder on onnxruntime CPU"}
    for fp16 in (False, True):
        key = "fp16" if fp16 else "fp32"
        sc = TorchPairScorer(bundle, dev, fp16=fp16, tile_to=args.tile_to)
        out_rows = sc.num_rows  # rows of the device tables the scorer-only measurements gather from
        out: dict[str, Any] = {"table_rows": out_rows}
        # parity with onnxruntime CPU on one request
        rows = rng.choice(bundle.num_entities, size=min(2048, bundle.num_entities), replace=False).astype(np.int64)
        want = host.score(ctxs[0], rows)
        got = sc.score(sc.user_feeds(ctxs[0]), rows)
        out["max_abs_diff_vs_onnxruntime_cpu"] = float(np.max(np.abs(got - want)))
        # (a) eager scorer latency per batch size
        user = sc.user_feeds(ctxs[0])
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
        # (b) CUDA graph of the scorer call, static buffers
        out["cuda_graph"] = []
        for b in args.batches if cuda else []:
            b = min(b, bundle.num_entities)
            try:
                static_rows = torch.from_numpy(rng.integers(0, out_rows, size=b)).to(dev)
                static_user = {k: v.clone() for k, v in user.items()}
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(3):
                        sc.score_device(static_user, static_rows)
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    static_out = sc.score_device(static_user, static_rows)
                sync()
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < args.seconds / 8:
                    g.replay()
                    n += 1
                sync()
                ms = (time.perf_counter() - t0) * 1e3 / n
                del static_out
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
                u = sc.user_feeds(ctxs[i % len(ctxs)])
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
        # (d) batching concurrent requests: U users x P candidates in one vmapped call
        out["vmap_batched"] = []
        for users in args.users_per_call:
            try:
                feeds = [sc.user_feeds(c) for c in ctxs[:users]]
                stacked = {k: torch.stack([f[k] for f in feeds]) for k in feeds[0]}
                rows = torch.from_numpy(rng.integers(0, out_rows, size=(users, args.pairs))).to(dev)
                fn = torch.vmap(lambda u, r, sc=sc: sc.score_device(u, r))
                fn(stacked, rows)
                sync()
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < args.seconds / 8:
                    fn(stacked, rows)
                    n += 1
                sync()
                ms = (time.perf_counter() - t0) * 1e3 / n
                qps = users / ms * 1e3
                out["vmap_batched"].append({"users": users, "pairs_per_user": args.pairs, "ms_per_call": ms,
                                            "equivalent_qps": qps, "pairs_per_s": users * args.pairs / ms * 1e3})
                print(f"torch {key} vmap {users} users x {args.pairs} pairs: {ms:.2f} ms/call -> {qps:.0f} queries/s of scoring")
            except Exception as exc:
                out["vmap_batched"].append({"users": users, "error": str(exc).splitlines()[0][:200]})
                print(f"torch {key} vmap {users} users: failed ({str(exc).splitlines()[0][:120]})")
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
