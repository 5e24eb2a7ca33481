"""Train / validation / test split by time: the last interactions of each user in each domain held out.

Leave-last-out per (user, domain): with ``n`` interactions in a domain, the last one is test and the
one before it validation, provided at least ``min_train`` remain for training. This mirrors how the
service is used (the future is predicted from the past), and it guarantees no test interaction is
older than a training interaction of the same user and domain.
"""

from __future__ import annotations

import numpy as np

from model.data.dataset import TEST, TRAIN, VALID


def leave_last_out(
    user: np.ndarray,
    domain: np.ndarray,
    timestamp: np.ndarray,
    *,
    num_domains: int,
    n_test: int = 1,
    n_valid: int = 1,
    min_train: int = 1,
) -> np.ndarray:
    """Return (I,) int8 split labels for interactions in any order (vectorised).

    Args:
        user, domain, timestamp: (I,) parallel arrays.
        num_domains: K, to form the (user, domain) group key.
        n_test, n_valid: interactions held out per (user, domain), latest first to test.
        min_train: groups with fewer than ``n_test + n_valid + min_train`` interactions stay in train.
    """
    n = user.shape[0]
    key = user.astype(np.int64) * num_domains + domain.astype(np.int64)
    order = np.lexsort((np.arange(n), timestamp, key))  # group, then time, then input order
    k_sorted = key[order]
    starts = np.r_[0, np.flatnonzero(k_sorted[1:] != k_sorted[:-1]) + 1]
    sizes = np.diff(np.r_[starts, n])
    group_end = np.repeat(starts + sizes, sizes)  # one past the last row of each row's group
    group_size = np.repeat(sizes, sizes)
    rank_from_end = group_end - np.arange(n) - 1  # 0 = latest in its group
    eligible = group_size >= n_test + n_valid + min_train
    labels_sorted = np.full(n, TRAIN, dtype=np.int8)
    labels_sorted[eligible & (rank_from_end < n_test)] = TEST
    labels_sorted[eligible & (rank_from_end >= n_test) & (rank_from_end < n_test + n_valid)] = VALID
    labels = np.empty(n, dtype=np.int8)
    labels[order] = labels_sorted
    return labels
