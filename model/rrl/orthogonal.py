"""Orthogonality constraint between shared and specific representations (paper III-D-3, Eq. 24).

Eq. 24 as printed is L = sum_k ||E_s^k^T E_d^k - I||_F^2 over the (n_k, h) matrices of domain k's
examples; we use the per-example cross-correlation E_s^k^T E_d^k / n_k in place of the raw product
(see ``forward``). Note what it rewards: it is zero when the cross-correlation E_s^T E_d equals the
identity (e.g. E_s = E_d = sqrt(n_k) Q with Q's columns orthonormal), and it equals h per domain when the two
representations are mutually orthogonal (E_s^T E_d = 0). The text's stated intent, "E_s and E_d
orthogonal to each other", is the soft orthogonality ||E_s^T E_d||_F^2 of domain separation networks
(Bousmalis et al. 2016), which is zero exactly for mutually orthogonal inputs. Both are offered:
``OrthoMode.PAPER`` (default, faithful to the equation) and ``OrthoMode.DIFFERENCE``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.config import OrthoMode


class OrthogonalityLoss(nn.Module):
    """Inputs: E_s (N, h), E_d (N, h), domain (N,). Output: scalar sum over domains of Eq. 24."""

    def __init__(self, num_domains: int, mode: OrthoMode | str = OrthoMode.PAPER) -> None:
        super().__init__()
        try:
            self.mode = OrthoMode(mode)
        except ValueError:
            raise ValueError(f"orthogonality mode must be 'paper' or 'difference', got {mode!r}") from None
        self.num_domains = num_domains

    def forward(self, e_s: Tensor, e_d: Tensor, domain: Tensor) -> Tensor:
        h = e_s.shape[-1]
        eye = torch.eye(h, dtype=e_s.dtype, device=e_s.device)
        total = e_s.new_zeros(())
        for k in range(self.num_domains):
            sel = domain == k
            if not bool(sel.any()):
                continue
            # divided by n_k: the per-example cross-correlation, so the loss (and the 0.01 weight) means
            # the same for any batch size; the raw sum of Eq. 24 grows with n_k^2 and, in a first Adam
            # step, drove every ReLU of the experts dead on the tiny preset (CE stopped moving)
            cross = e_s[sel].t() @ e_d[sel] / sel.sum()  # (h, h)
            if self.mode is OrthoMode.PAPER:
                cross = cross - eye
            total = total + (cross**2).sum()
        return total
