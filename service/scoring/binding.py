"""The one IOBinding helper: bind device-resident and host inputs, run, copy the scores back.

The device scorers keep the entity tables (and, per request, the user outputs) on the device as
OrtValues; a step then moves only the row indices (and for merged calls the stacked user inputs) and
the scores. ``run_bound`` is the single place that does that dance.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def run_bound(
    session: Any,
    device_values: Mapping[str, Any],
    host_inputs: Mapping[str, np.ndarray],
    *,
    device: str,
    device_id: int,
    output: str = "score",
) -> np.ndarray:
    """Run ``session`` with ``device_values`` (OrtValues, bound as they are) and ``host_inputs`` (copied
    to the device by onnxruntime); returns ``output`` as a float32 host array, its shape kept."""
    io = session.io_binding()
    for name, value in device_values.items():
        io.bind_ortvalue_input(name, value)
    for name, array in host_inputs.items():
        io.bind_cpu_input(name, np.ascontiguousarray(array))
    io.bind_output(output, device, device_id)
    session.run_with_iobinding(io)
    return np.asarray(io.copy_outputs_to_cpu()[0], dtype=np.float32)
