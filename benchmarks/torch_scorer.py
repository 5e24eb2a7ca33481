"""The bundle's pair scorer as a PyTorch module on a device, rebuilt from the run's checkpoint.

For measuring the GPU scoring design where onnxruntime has no CUDA provider (the lent machine has a
CPU onnxruntime and a CUDA PyTorch). The network is the one ``unimatch export`` traced to
``pair_scorer.onnx`` (``model.export.PairScorerGraph``, and ``BatchedPairScorerGraph`` for U users
each with their own candidates), loaded from the run directory the bundle's manifest names; the
entity tensors are the bundle's own ``entities/*.npy``, resident on the device, gathered inside the
call (``index_select``). Benchmarks only: the serving path (``service/``) never imports torch.

Precisions: ``fp32``; ``bf16`` (weights and tables cast to bfloat16: float32's exponent range, so
the -1e9 masking constants stay finite); ``fp16`` (tables in float16, the network under
``torch.autocast(float16)`` with float32 weights, because -1e9 overflows float16 and an all-padding
history would turn into NaN). ``CudaGraphScorer`` captures one call per fixed batch bucket.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PRECISIONS = ("fp32", "bf16", "fp16")


class TorchPairScorer:
    """(user outputs of one or U users, candidate rows) -> scores, on ``device``."""

    def __init__(self, run: Path, entity_tensors: dict[str, np.ndarray], device: Any, precision: str = "fp32",
                 *, tile_to: int = 0, data: Path | None = None) -> None:
        import torch

        from model.backbones import DeepMatchingModel
        from model.checkpoint import load_run
        from model.export import BatchedPairScorerGraph, PairScorerGraph

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.torch = torch
        self.device = torch.device(device)
        self.precision = precision
        loaded = load_run(Path(run), data=data)
        model = loaded.model.eval()
        self.num_domains = loaded.dataset.schema.num_domains
        self.user_output_names = list(model.user_output_names)
        self.entity_tensor_names = list(model.entity_tensor_names)
        self.weight_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.table_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        model = model.to(self.device, self.weight_dtype)
        self.graph = PairScorerGraph(model, self.num_domains).to(self.device).eval()
        self.batched = (
            BatchedPairScorerGraph(model, self.num_domains).to(self.device).eval()
            if isinstance(model, DeepMatchingModel) else None
        )
        self.tables = {n: torch.from_numpy(np.array(entity_tensors[n])).to(self.device, self.table_dtype)
                       for n in self.entity_tensor_names}
        num = next(iter(self.tables.values())).shape[0]
        if tile_to > num:  # a larger catalogue's device tables (rows repeated): gather cost at scale
            reps = -(-tile_to // num)
            self.tables = {n: t.repeat(reps, *([1] * (t.dim() - 1)))[:tile_to].contiguous() for n, t in self.tables.items()}
        self.num_rows = next(iter(self.tables.values())).shape[0]

    # ---- inputs --------------------------------------------------------------------------------
    def user_feeds(self, outputs: dict[str, np.ndarray], domain: int | np.ndarray) -> dict[str, Any]:
        """The user encoder's outputs (leading dim 1, or U) and the domain(s), on the device."""
        t = self.torch
        feeds = {n: t.from_numpy(np.ascontiguousarray(outputs[n])).to(self.device, self.weight_dtype)
                 for n in self.user_output_names}
        feeds["domain"] = t.as_tensor(np.atleast_1d(np.asarray(domain, dtype=np.int64)), device=self.device)
        return feeds

    def _autocast(self) -> Any:
        # no cast cache: weights cast inside a CUDA-graph capture must be recast by every replay, not
        # read from a cache entry freed when the capture's autocast context closes
        return self.torch.autocast(self.device.type, dtype=self.torch.float16, enabled=self.precision == "fp16",
                                   cache_enabled=False)

    # ---- calls ---------------------------------------------------------------------------------
    def score_device(self, user: dict[str, Any], rows: Any) -> Any:
        """One user (leading dim 1) x rows (C,) on the device -> (C,) scores on the device."""
        t = self.torch
        with t.inference_mode(), self._autocast():
            ents = [t.index_select(self.tables[n], 0, rows).to(self.weight_dtype) for n in self.entity_tensor_names]
            return self.graph(*(user[n] for n in self.user_output_names), user["domain"], *ents)

    def score_batched_device(self, users: dict[str, Any], rows: Any) -> Any:
        """U users (leading dim U) x their own rows (U, C) -> (U, C): one call for U requests' steps."""
        if self.batched is None:
            raise ValueError("a two-tower bundle has no batched pair scorer")
        t = self.torch
        u, c = rows.shape
        with t.inference_mode(), self._autocast():
            ents = [t.index_select(self.tables[n], 0, rows.reshape(-1)).reshape(u, c, *self.tables[n].shape[1:])
                    .to(self.weight_dtype) for n in self.entity_tensor_names]
            return self.batched(*(users[n] for n in self.user_output_names), users["domain"], *ents)

    def score(self, user: dict[str, Any], rows: np.ndarray) -> np.ndarray:
        """Host rows in, host float32 scores out (what service.search's score callback expects)."""
        r = self.torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(self.device, non_blocking=True)
        return self.score_device(user, r).float().cpu().numpy()


class CudaGraphScorer:
    """``TorchPairScorer.score_device`` captured as one CUDA graph per fixed batch bucket.

    Static input buffers (user outputs, rows) are filled in place and the graph replayed, so a call
    costs one launch instead of one per kernel; a batch is padded up to the next bucket.
    """

    def __init__(self, scorer: TorchPairScorer, user: dict[str, Any], buckets: list[int]) -> None:
        torch = scorer.torch
        self.scorer = scorer
        self.user = {k: v.clone() for k, v in user.items()}
        self.buckets = sorted(buckets)
        self.graphs: dict[int, tuple[Any, Any, Any]] = {}
        for b in self.buckets:
            rows = torch.zeros(b, dtype=torch.long, device=scorer.device)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):  # warm-up outside the capture (cuBLAS workspaces, autocast caches)
                    scorer.score_device(self.user, rows)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = scorer.score_device(self.user, rows)
            self.graphs[b] = (g, rows, out)

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if n <= b:
                return b
        raise ValueError(f"{n} candidates exceed the largest bucket {self.buckets[-1]}")

    def replay(self, b: int) -> Any:
        g, _, out = self.graphs[b]
        g.replay()
        return out

    def score_device(self, rows: Any) -> Any:
        b = self.bucket(rows.shape[0])
        g, static_rows, out = self.graphs[b]
        static_rows[: rows.shape[0]].copy_(rows)
        static_rows[rows.shape[0] :].zero_()
        g.replay()
        return out[: rows.shape[0]]
