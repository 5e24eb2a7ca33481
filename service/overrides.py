"""A request's inline feature overrides applied to the stored features (``MatchRequest.features``).

The ranking stage may send what it knows better than the store: categorical codes, numerics, a full
behaviour sequence or the most recent entities. They replace the stored values for this request only;
unknown feature names and out-of-range codes are bad requests, unknown entity ids are counted and
dropped (a catalogue changes faster than the caller's view of it).
"""

from __future__ import annotations

import math

import numpy as np

from contracts.bundle import Bundle
from contracts.dataset import PAD
from contracts.features import UserFeatures
from service.errors import InvalidRequest
from service.schemas import FeatureOverrides
from service.vocabulary import Vocabulary, rows_of


def apply_overrides(
    base: UserFeatures, over: FeatureOverrides | None, vocab: Vocabulary, bundle: Bundle
) -> tuple[UserFeatures, int]:
    """``base`` with ``over`` applied; returns the features and the count of unknown override entity ids."""
    if over is None:
        return base, 0
    cat, num, seq = base.cat, base.num, base.seq
    if over.categorical:
        cat = cat.copy()
        for name, code in over.categorical.items():
            if name not in vocab.categorical:
                raise InvalidRequest(f"unknown categorical feature {name!r}; expected one of {list(vocab.categorical)}")
            col, cardinality = vocab.categorical[name]
            if not 0 <= code < cardinality:
                raise InvalidRequest(f"feature {name!r}: code {code} outside [0, {cardinality})")
            cat[col] = code
    if over.numeric:
        num = num.copy()
        for name, value in over.numeric.items():
            if name not in vocab.numeric:
                raise InvalidRequest(f"unknown numeric feature {name!r}; expected one of {list(vocab.numeric)}")
            if not math.isfinite(value):
                raise InvalidRequest(f"feature {name!r}: value must be finite")
            num[vocab.numeric[name]] = value
    unknown = 0
    if over.sequence is not None or over.recent:
        if over.sequence is not None:
            history, unknown = rows_of(bundle.row_of, over.sequence)
        else:
            history = seq[seq != PAD]
        recent, unknown_recent = rows_of(bundle.row_of, over.recent)
        unknown += unknown_recent
        history = np.concatenate([history, recent])[-vocab.max_seq_len :]
        seq = np.full(vocab.max_seq_len, PAD, dtype=np.int64)
        if history.size:
            seq[vocab.max_seq_len - history.size :] = history
    return UserFeatures(cat=np.asarray(cat, dtype=np.int64), num=np.asarray(num, dtype=np.float32), seq=seq), unknown
