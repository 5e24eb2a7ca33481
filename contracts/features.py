"""The user-features value type: what the feature store hands the engine (docs/bundle-format.md).

One user's online features, encoded as the dataset stores them and the model consumes them: the
schema's user categorical codes and numerics, and the behaviour sequence of entity rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from contracts.dataset import PAD
from contracts.schema import FeatureSchema


@dataclass(frozen=True)
class UserFeatures:
    """One user's features: both stores (Redis and the embedded table) return it, the engine takes it."""

    cat: np.ndarray  # (Cu,) int64 categorical codes (0 = unknown)
    num: np.ndarray  # (Cn,) float32
    seq: np.ndarray  # (L,) int64 entity rows, most recent last, left-padded with PAD (-1)

    @classmethod
    def cold_start(cls, schema: FeatureSchema) -> UserFeatures:
        """A user with no profile and no history: the schema's declared defaults, an empty sequence."""
        return cls(
            cat=np.array([c.default for c in schema.user_categorical], dtype=np.int64),
            num=np.array([c.default for c in schema.user_numeric], dtype=np.float32),
            seq=np.full(schema.max_seq_len, PAD, dtype=np.int64),
        )
