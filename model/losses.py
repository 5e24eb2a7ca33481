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
    """The candidate set of one step and its log-Q and validity mask, in one of two layouts.

    Per-batch layout (``positive`` is None): ``rows`` (C,) are scored by every user, the first B of
    them the batch's positives; logits (B, C), user b's target is column b; ``log_q`` (C,).
    Own-positive layout (``LossConfig.shared_in_batch``): each user's own positive ``positive`` (B,)
    is scored as column 0 and ``rows`` (N,) are the negatives shared by the batch; logits (B, 1 + N),
    the target is column 0; ``log_q`` (B, 1 + N). ``valid`` is (B, C) or (B, 1 + N).
    """

    rows: Tensor
    log_q: Tensor
    valid: Tensor
    positive: Tensor | None = None

    def to(self, device: torch.device, *, non_blocking: bool = False) -> Candidates:
        def move(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=non_blocking)

        return Candidates(
            move(self.rows), move(self.log_q), move(self.valid), None if self.positive is None else move(self.positive)
        )

    def pin_memory(self) -> Candidates:
        return Candidates(
            self.rows.pin_memory(), self.log_q.pin_memory(), self.valid.pin_memory(),
            None if self.positive is None else self.positive.pin_memory(),
        )

    def target(self) -> Tensor:
        """(B,) the column of each user's positive."""
        b = self.valid.shape[0]
        if self.positive is not None:
            return torch.zeros(b, dtype=torch.long, device=self.valid.device)
        return torch.arange(b, device=self.valid.device)


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
        """pos (B,) positive rows, domain (B,) -> the step's candidates (the layout of ``LossConfig``)."""
        if self.cfg.shared_in_batch is not None:
            return self._own_positive(pos.long(), domain.long())
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

    def _own_positive(self, pos: Tensor, domain: Tensor) -> Candidates:
        """Own positive + N = M' + S shared negatives, M' = min(shared_in_batch, B) of the batch's positives.

        The M' positives are a uniform subsample (without replacement) of the batch, itself a uniform
        sample of the training interactions, so entity a is expected M' p_pos(a) times among them and
        S q(a) times among the sampled ones: log-Q = log(M' p_pos(a) + S q(a)) (Eq. 2), for the
        positive column too, exactly as in the per-batch layout with B in place of M'.
        """
        b, s = pos.shape[0], self.cfg.num_sampled
        m = min(int(self.cfg.shared_in_batch or 0), b) if self.cfg.in_batch else 0
        parts = []
        if m:
            # all B in their order when m == B: no draw, so the stream of sampled negatives is unchanged
            parts.append(pos if m == b else pos[torch.randperm(b, generator=self.gen)[:m]])
        if s > 0:
            parts.append(self.sample(s))
        rows = torch.cat(parts) if parts else pos.new_zeros(0)

        def log_q_of(r: Tensor) -> Tensor:
            return torch.log((s * self.q[r] + m * self.p_pos[r]).clamp(min=1e-30)).to(torch.float32)

        # gathers over the catalogue once per shared row (N,) and per positive (B,), never per (user,
        # row) pair: at B = 4096 the (B, 1 + N) gathers cost more than a GPU step
        log_q = torch.cat([log_q_of(pos).unsqueeze(1), log_q_of(rows).unsqueeze(0).expand(b, -1)], dim=1)  # (B, 1 + N)
        shared = rows.unsqueeze(0) != pos.unsqueeze(1)  # (B, N): accidental hits of the own positive
        if self.cfg.mask_ineligible:
            shared &= ((self.domain_mask[rows].unsqueeze(0) >> domain.unsqueeze(1)) & 1).bool()
        valid = torch.cat([torch.ones(b, 1, dtype=torch.bool), shared], dim=1)  # the positive always counts
        return Candidates(rows=rows, log_q=log_q, valid=valid, positive=pos)


class SampledSoftmaxLoss(nn.Module):
    """Per-example cross entropy of each user's positive over its valid candidates.

    Inputs: logits (B, C) from the model (either layout of ``Candidates``), ``Candidates``.
    Output: (B,) float32 losses (Eq. 4 / Eq. 12 before the sum), so the trainer can log each domain's
    mean. Computed in float32 whatever the logits' dtype (bf16 autocast): the masked logits and the
    log-Q terms need float32's precision.
    """

    def __init__(self, log_q: bool = True) -> None:
        super().__init__()
        self.log_q = log_q

    def forward(self, logits: Tensor, cand: Candidates) -> Tensor:
        logits = logits.float()
        if self.log_q:  # Eq. 2
            z = logits - (cand.log_q if cand.log_q.dim() == 2 else cand.log_q.unsqueeze(0))
        else:
            z = logits
        z = torch.where(cand.valid, z, torch.full_like(z, MASK_VALUE))
        return F.cross_entropy(z, cand.target(), reduction="none")  # (B,)
