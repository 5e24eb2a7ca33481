"""Train / validation / test split by time: the last interactions of each user in each domain held out.

Leave-last-out per (user, domain): with ``n`` interactions in a domain, the last one is test and the
one before it validation, provided at least ``min_train`` remain for training. This mirrors how the
service is used (the future is predicted from the past), and it guarantees no test interaction is
older than a training interaction of the same user and domain.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from contracts.dataset import SPLIT_NAMES, TEST, TRAIN, VALID


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


# A test set smaller than this many queries (users evaluated in a domain) gives Recall-all figures
# whose noise swamps differences between methods (binomial s.e. at recall 0.1 and 100 queries: 0.03).
MIN_TEST_QUERIES = 100
MIN_TEST_USER_SHARE = 0.01


def split_report(
    user: np.ndarray, domain: np.ndarray, split: np.ndarray, *, domains: list[str], num_users: int
) -> dict[str, Any]:
    """Per domain: interactions per split, queries (distinct users) per split, warnings.

    A *query* is one (user, domain) with held-out interactions: what ``unimatch eval`` scores. A
    warning is raised for a domain whose test set has under ``MIN_TEST_QUERIES`` queries or under
    ``MIN_TEST_USER_SHARE`` of the domain's users.
    """
    K = len(domains)
    key = user.astype(np.int64) * K + domain.astype(np.int64)
    per: dict[str, Any] = {}
    warnings: list[str] = []
    groups = np.unique(key)
    group_dom = groups % K
    for k, name in enumerate(domains):
        in_k = domain == k
        counts = {SPLIT_NAMES[j]: int((in_k & (split == j)).sum()) for j in (TRAIN, VALID, TEST)}
        queries = {SPLIT_NAMES[j]: int(np.unique(key[in_k & (split == j)]).size) for j in (TRAIN, VALID, TEST)}
        users_k = int((group_dom == k).sum())
        per[name] = {"interactions": counts, "queries": queries, "users": users_k}
        test_q = queries[SPLIT_NAMES[TEST]]
        if users_k and (test_q < MIN_TEST_QUERIES or test_q < MIN_TEST_USER_SHARE * users_k):
            share = test_q / users_k
            why = []
            if test_q < MIN_TEST_QUERIES:
                why.append(f"under {MIN_TEST_QUERIES} queries")
            if share < MIN_TEST_USER_SHARE:
                why.append(f"under {MIN_TEST_USER_SHARE:.0%} of its users")
            hint = (
                "; most users are too short to hold one out: lower the split's min_train / n_valid, or ship a split column"
                if share < 0.5
                else ""
            )
            warnings.append(
                f"domain {name!r}: {test_q:,} test queries ({share:.1%} of its {users_k:,} users): "
                f"Recall-all on {' and '.join(why)} is mostly noise{hint}"
            )
    return {"domains": per, "warnings": warnings, "num_users": int(num_users)}
