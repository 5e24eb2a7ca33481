"""Sampled softmax with log-Q correction and its candidate sets (paper Eqs. 2-4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.config import LossConfig, NegativeSampler
from model.losses import CandidateSampler, SampledSoftmaxLoss


def _sampler(cfg: LossConfig, counts: np.ndarray | None = None, mask: np.ndarray | None = None) -> CandidateSampler:
    counts = np.array([10, 0, 5, 5, 80], dtype=np.int64) if counts is None else counts
    mask = np.full(counts.shape[0], 0b11, dtype=np.uint64) if mask is None else mask
    return CandidateSampler(cfg, counts, mask, seed=0)


def test_log_q_is_the_expected_count_of_each_candidate() -> None:
    cfg = LossConfig(num_sampled=3, sampler=NegativeSampler.UNIFORM)
    s = _sampler(cfg)
    cand = s.candidates(torch.tensor([0, 4]), torch.tensor([0, 1]))
    assert cand.rows.shape == (5,) and cand.rows[:2].tolist() == [0, 4]
    p_pos = np.array([0.1, 0, 0.05, 0.05, 0.8])
    expected = 2 * p_pos[cand.rows.numpy()] + 3 * 0.2
    np.testing.assert_allclose(cand.log_q.numpy(), np.log(expected), rtol=1e-6)


def test_popularity_sampler_follows_smoothed_counts() -> None:
    cfg = LossConfig(num_sampled=20000, popularity_power=1.0)
    s = _sampler(cfg)
    freq = np.bincount(s.sample(20000).numpy(), minlength=5) / 20000
    q = (np.array([10, 0, 5, 5, 80]) + 1.0) / 105.0
    np.testing.assert_allclose(freq, q, atol=0.015)


def test_masks_drop_accidental_hits_and_ineligible_but_keep_the_positive() -> None:
    mask = np.array([0b01, 0b01, 0b10, 0b11, 0b11], dtype=np.uint64)
    s = _sampler(LossConfig(num_sampled=0), mask=mask)
    pos = torch.tensor([0, 2, 0])
    cand = s.candidates(pos, torch.tensor([0, 1, 0]))
    valid = cand.valid.tolist()
    assert valid[0] == [True, False, False]  # own positive; entity 2 not in domain 0; duplicate of own positive
    assert valid[1] == [False, True, False]  # entity 0 is not eligible in domain 1
    assert valid[2] == [False, False, True]


def test_sampled_softmax_with_uniform_q_equals_plain_cross_entropy() -> None:
    s = _sampler(LossConfig(num_sampled=4, sampler=NegativeSampler.UNIFORM, in_batch=False, mask_ineligible=False))
    pos = torch.tensor([1, 3])
    cand = s.candidates(pos, torch.tensor([0, 0]))
    logits = torch.randn(2, cand.rows.shape[0])
    loss = SampledSoftmaxLoss(log_q=True)(logits, cand)
    # without in-batch, Q is the same for every candidate: a constant shift, softmax unchanged
    z = torch.where(cand.valid, logits, torch.full_like(logits, -1e9))
    ref = F.cross_entropy(z, torch.arange(2), reduction="none")
    torch.testing.assert_close(loss, ref)


def test_log_q_lowers_the_penalty_of_popular_negatives() -> None:
    s = _sampler(LossConfig(num_sampled=0))
    cand = s.candidates(torch.tensor([1, 4]), torch.tensor([0, 0]))
    logits = torch.zeros(2, 2)
    with_q = SampledSoftmaxLoss(log_q=True)(logits, cand)
    without = SampledSoftmaxLoss(log_q=False)(logits, cand)
    # user 0's negative is the very popular entity 4: corrected, it competes less
    assert float(with_q[0]) < float(without[0]) == pytest.approx(np.log(2))
