"""Domain adversarial learning (paper III-D-1, Algorithm 2, Eqs. 13-17).

The shared-domain classifier V_s sees E_s through a gradient-reversal layer and has spectrally
normalised weights (Eq. 15, via ``torch.nn.utils.parametrizations.spectral_norm``): V_s learns to tell
the domain from E_s while the shared expert, receiving the reversed gradient, learns to hide it
(min over theta*, max over varpi_s, Eq. 13). The specific-domain classifier V_d is ordinary: both V_d
and the domain experts minimise Eq. 16, so E_d keeps what is unique to its domain.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from model.layers import GradientReversal


class DomainAdversarialLoss(nn.Module):
    """Inputs: E_s (N, h), E_d (N, h) of the positive pairs, domain labels (N,).

    Returns (L_s, L_d): mean cross entropies of the shared classifier (behind the GRL, Eq. 13-14) and
    of the specific classifier (Eq. 16-17). Paper V-A3: each classifier is a single hidden layer of 64.
    """

    def __init__(self, in_dim: int, num_domains: int, hidden: int = 64, grl_lambda: float = 1.0) -> None:
        super().__init__()
        self.grl = GradientReversal(grl_lambda)
        self.shared_classifier = nn.Sequential(
            spectral_norm(nn.Linear(in_dim, hidden)), nn.ReLU(), spectral_norm(nn.Linear(hidden, num_domains))
        )
        self.specific_classifier = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_domains))

    def forward(self, e_s: Tensor, e_d: Tensor, domain: Tensor) -> tuple[Tensor, Tensor]:
        loss_s = F.cross_entropy(self.shared_classifier(self.grl(e_s)), domain.long())
        loss_d = F.cross_entropy(self.specific_classifier(e_d), domain.long())
        return loss_s, loss_d
