"""Sampled softmax with log-Q correction, per domain (paper Eqs. 2-4 and 12).

Each training step scores B users against C candidates: the batch's own positives (in-batch
negatives for the other users) and S extra negatives shared by the batch, drawn from a declared
distribution Q (uniform or popularity). The logit of candidate a is corrected by log Q(a): the
expected number of times a appears among the candidates, ``B * p_pos(a) + S * q(a)`` (Yi et al. 2019,
"mixed negative sampling" of Yang et al. 2020), so that popular entities are not over-penalised
merely for being sampled often. A candidate that the user's domain cannot show (``domain_mask``) or
that is the user's own positive appearing again ("accidental hit") is masked out, so every softmax
runs over the eligible entities of that user's domain only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import LossConfig, NegativeSampler
from model.layers import MASK_VALUE


@dataclass
class Candidates:
    """The candidate set of one step: rows (C,), their log-Q (C,), and the (B, C) validity mask."""

    rows: Tensor  # (C,) entity rows; the first B are the batch's positives
    log_q: Tensor  # (C,)
    valid: Tensor  # (B, C) bool


class CandidateSampler:
    """Draws the shared negatives from Q and builds the candidate set with its log-Q and masks."""

    def __init__(self, cfg: LossConfig, positive_counts: np.ndarray, domain_mask: np.ndarray, *, seed: int) -> None:
        counts = np.asarray(positive_counts, dtype=np.float64)
        n = counts.shape[0]
        self.cfg = cfg
        if cfg.sampler is NegativeSampler.UNIFORM:
            q = np.full(n, 1.0 / n)
        else:
            # +1 smoothing: entities never clicked in training still get sampled as negatives sometimes
            q = (counts + 1.0) ** cfg.popularity_power
            q /= q.sum()
        self.q = torch.as_tensor(q, dtype=torch.float64)
        self.cdf = torch.cumsum(self.q, 0)
        self.p_pos = torch.as_tensor(counts / max(counts.sum(), 1.0), dtype=torch.float64)
        self.domain_mask = torch.as_tensor(np.asarray(domain_mask).astype(np.int64), dtype=torch.long)
        self.gen = torch.Generator().manual_seed(seed)

    def sample(self, n: int) -> Tensor:
        u = torch.rand(n, generator=self.gen, dtype=torch.float64)
        return torch.searchsorted(self.cdf, u * self.cdf[-1]).clamp_(max=self.q.shape[0] - 1)

    def candidates(self, pos: Tensor, domain: Tensor) -> Candidates:
        """pos (B,) positive rows, domain (B,) -> the step's candidates (positives first)."""
        b, s = pos.shape[0], self.cfg.num_sampled
        rows = torch.cat([pos.long(), self.sample(s)]) if s > 0 else pos.long()
        expected = s * self.q[rows]
        if self.cfg.in_batch:
            expected = expected + b * self.p_pos[rows]
        log_q = torch.log(expected.clamp(min=1e-30)).to(torch.float32)
        c = rows.shape[0]
        diag = torch.zeros(b, c, dtype=torch.bool)
        diag[:, :b] = torch.eye(b, dtype=torch.bool)
        valid = rows.unsqueeze(0) != pos.long().unsqueeze(1)  # accidental hits of the own positive
        if not self.cfg.in_batch:
            valid[:, :b] = False
        if self.cfg.mask_ineligible:
            bits = (self.domain_mask[rows].unsqueeze(0) >> domain.long().unsqueeze(1)) & 1  # (B, C)
            valid &= bits.bool()
        valid |= diag  # the positive itself always counts
        return Candidates(rows=rows, log_q=log_q, valid=valid)


class SampledSoftmaxLoss(nn.Module):
    """Per-example cross entropy of the positive (candidate b for user b) over its valid candidates.

    Inputs: logits (B, C) from the model, ``Candidates``. Output: (B,) losses (Eq. 4 / Eq. 12 before
    the sum), so the trainer can log each domain's mean.
    """

    def __init__(self, log_q: bool = True) -> None:
        super().__init__()
        self.log_q = log_q

    def forward(self, logits: Tensor, cand: Candidates) -> Tensor:
        z = logits - cand.log_q.unsqueeze(0) if self.log_q else logits  # Eq. 2
        z = torch.where(cand.valid, z, torch.full_like(z, MASK_VALUE))
        target = torch.arange(logits.shape[0], device=logits.device)
        return F.cross_entropy(z, target, reduction="none")  # (B,)
