"""The CPU scoring path: onnxruntime sessions for the user encoder and the pair scorer, host gathers.

Paper section IV-B: the deep model itself scores every candidate the graph search reaches. The user
encoder runs once per request; the pair scorer runs once per expansion step on the whole frontier
(NANN: "score all of N with the model in ONE batch"). Here the entity-side tensors are gathered with
numpy from the bundle's memory maps, then fed to ``pair_scorer.onnx``. The device path
(``service.scoring.device``) and request batching (``service.scoring.batching``) build on this class.

Session options are chosen for a serving process that runs many requests concurrently on a thread
pool (see ``session_options``). onnxruntime and numpy only; never torch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from contracts.bundle import Bundle
from contracts.manifest import BundleError

log = logging.getLogger("unimatch.scorer")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def session_options(intra_op_threads: int) -> Any:
    """onnxruntime session options for serving; every choice is deliberate.

    * ``intra_op_num_threads``: the service parallelises across requests (one request per worker
      thread, ``InferenceSession.run`` releases the GIL and is thread-safe), so the default is 1 thread
      per call: no fork/join cost on small frontiers and no oversubscription. Raise it only for a
      single-stream latency benchmark with spare cores.
    * spinning off (``session.intra_op.allow_spinning = 0``): idle pool threads would otherwise busy-wait
      after each call and steal the cores other requests need; with 1 thread there is no pool at all.
    * ``inter_op_num_threads = 1`` and sequential execution: these graphs are chains; a parallel
      executor only adds scheduling overhead.
    * full graph optimisation (constant folding, GEMM/activation fusion) at load, once.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(intra_op_threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # warnings about unused initialisers are noise in serving logs
    return so


def choose_provider(requested: Sequence[str] | None) -> str:
    """CUDA when requested (or not specified) and available, else CPU — with a log line, never silently."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = list(requested) if requested is not None else [CUDA, CPU]
    unknown = [p for p in wanted if p not in (CUDA, CPU)]
    if unknown or not wanted:
        raise ValueError(f"unsupported onnxruntime providers {unknown or wanted}; use {CUDA!r} and/or {CPU!r}")
    if CUDA in wanted:
        if CUDA in available:
            return CUDA
        log.warning("onnxruntime CUDA provider not available (providers: %s); scoring on CPU", ", ".join(available))
    return CPU


@dataclass
class UserContext:
    """The user encoder's outputs for one request, ready to feed the pair scorer."""

    domain: int
    feeds: dict[str, np.ndarray]  # user outputs (leading dim 1) + "domain" (1,) int64
    device_values: dict[str, Any] = field(default_factory=dict)  # OrtValues on the scorer's device


class HostGatherScorer:
    """Pair scorer with entity tensors gathered on the host from memory maps (the CPU path)."""

    def __init__(
        self, bundle: Bundle, *, provider: str = CPU, intra_op_threads: int = 1, max_batch: int = 16384
    ) -> None:
        import onnxruntime as ort

        self.bundle = bundle
        self.provider = provider
        self.intra_op_threads = intra_op_threads
        # Bounds activation memory per call; a frontier larger than this is split (exhaustive mode).
        self.max_batch = int(max_batch)
        providers = [provider] if provider == CPU else [provider, CPU]
        so = session_options(intra_op_threads)
        self.user_outputs = list(bundle.manifest.get("user_outputs", []))
        self.user_session = ort.InferenceSession(str(bundle.path / "user_encoder.onnx"), so, providers=providers)
        self.pair_session = self._pair_session(ort, so, providers)
        got = [o.name for o in self.user_session.get_outputs()]
        missing = [n for n in self.user_outputs if n not in got]
        if missing:
            raise BundleError(f"{bundle.path}: user_encoder.onnx lacks outputs {missing} named in manifest.user_outputs")
        self.live: Any = None  # the engine's LiveCatalogue when live changes are on (rows beyond the bundle's)
        # Plain ndarray views of the memory maps: fancy indexing on np.memmap adds subclass overhead.
        self.tables = {name: np.asarray(arr) for name, arr in bundle.entity_tensors.items()}
        self._user_input_names = {i.name for i in self.user_session.get_inputs()}
        # An exporter drops inputs the graph does not use (e.g. `domain` of a domain-agnostic scorer).
        self._pair_input_names = {i.name for i in self.pair_session.get_inputs()}
        self._batched: Any = None  # pair_scorer_batched.onnx with host gathers (``score_many``), on first use
        self._batched_inputs: set[str] = set()
        self._batched_lock = threading.Lock()
        self._batched_loaded = False

    def _pair_session(self, ort: Any, so: Any, providers: list[str]) -> Any:
        return ort.InferenceSession(str(self.bundle.path / "pair_scorer.onnx"), so, providers=providers)

    def encode(self, cat: np.ndarray, num: np.ndarray, seq: np.ndarray, domain: int) -> UserContext:
        """Run the user encoder once: (Cu,), (Cn,), (L,) -> the pair scorer's user inputs."""
        dom = np.array([domain], dtype=np.int64)
        feeds = {
            "user_cat": np.asarray(cat, dtype=np.int64).reshape(1, -1),
            "user_num": np.asarray(num, dtype=np.float32).reshape(1, -1),
            "seq": np.asarray(seq, dtype=np.int64).reshape(1, -1),
            "domain": dom,
        }
        feeds = {k: v for k, v in feeds.items() if k in self._user_input_names}
        outs = self.user_session.run(self.user_outputs, feeds)
        ctx = {name: np.ascontiguousarray(o) for name, o in zip(self.user_outputs, outs, strict=True)}
        if "domain" in self._pair_input_names:
            ctx["domain"] = dom
        ctx = {k: v for k, v in ctx.items() if k in self._pair_input_names or f"{k}__users" in self._pair_input_names}
        return UserContext(domain=domain, feeds=ctx)

    def score(self, ctx: UserContext, rows: np.ndarray) -> np.ndarray:
        """(n,) int64 rows -> (n,) float32 scores; one onnxruntime call per ``max_batch`` rows."""
        return self.score_timed(ctx, rows)[0]

    def score_timed(self, ctx: UserContext, rows: np.ndarray) -> tuple[np.ndarray, float, float]:
        """``score`` plus (seconds gathering entity tensors, seconds inside onnxruntime calls)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size <= self.max_batch:
            return self._score_batch(ctx, rows)
        parts = [self._score_batch(ctx, rows[i : i + self.max_batch]) for i in range(0, rows.size, self.max_batch)]
        return np.concatenate([p[0] for p in parts]), sum(p[1] for p in parts), sum(p[2] for p in parts)

    def _score_batch(self, ctx: UserContext, rows: np.ndarray) -> tuple[np.ndarray, float, float]:
        t0 = time.perf_counter()
        feeds = dict(ctx.feeds)
        live = self.live
        if live is not None and rows.size and int(rows.max()) >= live.E:  # rows added online (service/live.py)
            for name, table in self.tables.items():
                feeds[name] = live.gather(name, table, rows)
        else:
            for name, table in self.tables.items():
                # ndarray.take: faster than fancy indexing for row gathers, and than np.take (a Python
                # wrapper around it: ~1 us a call, 2% of a 100k query's samples at ~20 calls a query)
                feeds[name] = table.take(rows, axis=0)
        t1 = time.perf_counter()
        (out,) = self.pair_session.run(["score"], feeds)
        t2 = time.perf_counter()
        return np.asarray(out, dtype=np.float32).reshape(-1), t1 - t0, t2 - t1

    # ---- several requests at once (the lockstep search, ``MatchEngine.match_many``) -----------------
    def score_many(
        self, ctxs: Sequence[UserContext], rows: Sequence[np.ndarray], *, merged: bool = False
    ) -> tuple[list[np.ndarray], float, float]:
        """Scores of each request's rows: per-request calls, or with ``merged`` ONE call of the bundle's
        ``pair_scorer_batched.onnx`` (users stacked, each request's rows padded to the longest).

        Returns (scores per request, seconds gathering, seconds inside onnxruntime). Per-request calls
        give each pair the score ``score`` gives it; a merged call may differ in the last float bit
        (another batch shape).
        """
        if merged and self.batched_session() is not None:
            return self._score_merged(ctxs, rows)
        out, gather_s, ort_s = [], 0.0, 0.0
        for ctx, r in zip(ctxs, rows, strict=True):
            scores, g, o = self.score_timed(ctx, r)
            out.append(scores)
            gather_s += g
            ort_s += o
        return out, gather_s, ort_s

    def batched_session(self) -> Any:
        """The bundle's ``pair_scorer_batched.onnx`` (host-gathered inputs), loaded on first use; None
        when the bundle has none (older exports, two-tower bundles)."""
        with self._batched_lock:
            if not self._batched_loaded:
                import onnxruntime as ort

                spec = self.bundle.manifest.get("batched_scorer")
                file = spec.get("file") if isinstance(spec, dict) else None
                if file:
                    providers = [self.provider] if self.provider == CPU else [self.provider, CPU]
                    self._batched = ort.InferenceSession(
                        str(self.bundle.path / str(file)), session_options(self.intra_op_threads), providers=providers
                    )
                    self._batched_inputs = {i.name for i in self._batched.get_inputs()}
                self._batched_loaded = True
        return self._batched

    def _score_merged(self, ctxs: Sequence[UserContext], rows: Sequence[np.ndarray]) -> tuple[list[np.ndarray], float, float]:
        t0 = time.perf_counter()
        sizes = [int(r.size) for r in rows]
        width = max(max(sizes, default=1), 1)
        grid = np.empty((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            grid[i, : r.size] = r
            grid[i, r.size :] = r[0] if r.size else 0  # padding: scored, then dropped
        feeds: dict[str, np.ndarray] = {
            name: np.concatenate([c.feeds[name] for c in ctxs]) for name in self.user_outputs if name in self._batched_inputs
        }
        if "domain" in self._batched_inputs:
            feeds["domain"] = np.array([c.domain for c in ctxs], dtype=np.int64)
        live = self.live
        for name, table in self.tables.items():
            if live is not None and int(grid.max()) >= live.E:  # rows added online (service/live.py)
                feeds[name] = live.gather(name, table, grid.reshape(-1)).reshape(*grid.shape, *table.shape[1:])
            else:
                feeds[name] = np.take(table, grid, axis=0)
        t1 = time.perf_counter()
        (out,) = self._batched.run(["score"], feeds)
        t2 = time.perf_counter()
        out = np.asarray(out, dtype=np.float32).reshape(len(rows), width)
        return [out[i, :n].copy() for i, n in enumerate(sizes)], t1 - t0, t2 - t1
