"""The model side of the retrieval engine: which scorer a process gets (``make_scorer``).

Three scorers share one interface (``encode`` once per request, ``score`` once per expansion step):
``host.HostGatherScorer`` (CPU: entity tensors gathered on the host), ``device.DeviceGatherScorer``
(entity tables resident on the device, gathered inside the graph) and ``batching.BatchingScorer``
(concurrent requests' steps merged into one device call); ``binding`` holds the one IOBinding helper.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from contracts.bundle import Bundle
from service.scoring.batching import BatchingScorer, BatchingUnsupported
from service.scoring.device import DeviceGatherScorer
from service.scoring.host import CUDA, HostGatherScorer, choose_provider

log = logging.getLogger("unimatch.scorer")


def make_scorer(
    bundle: Bundle,
    *,
    providers: Sequence[str] | None = None,
    intra_op_threads: int = 1,
    fp16_tables: bool = False,
    batch_requests: bool | None = None,
) -> HostGatherScorer:
    """The scorer for this machine: on CUDA, device-resident tables and (by default) concurrent requests
    merged into one call; on CPU, host gathers (batching buys nothing where each request has a core)."""
    provider = choose_provider(providers)
    if batch_requests is None:
        batch_requests = provider == CUDA
    try:
        if batch_requests:
            try:
                return BatchingScorer(bundle, provider=provider, intra_op_threads=intra_op_threads, fp16_tables=fp16_tables)
            except BatchingUnsupported as exc:
                log.warning("not batching concurrent requests: %s", exc)
        if provider == CUDA:
            return DeviceGatherScorer(bundle, provider=CUDA, intra_op_threads=intra_op_threads, fp16_tables=fp16_tables)
    except ImportError as exc:  # the graph rewrite needs `onnx`
        log.warning("device-side gather needs the onnx package (%s); gathering on the host instead", exc)
    return HostGatherScorer(bundle, provider=provider, intra_op_threads=intra_op_threads)
