"""The parts of the paper's backbone framework (III-C, Eqs. 5-11, Algorithm 1).

``SharedExpert`` (MLP_s, trained by every domain), ``DomainExperts`` (the K MLP_d^k, stored
stacked), ``DomainGate`` (w_g^k = sigmoid(E_did^k . theta_g^k), two weights, Eq. 8),
``concat_fusion`` (Eq. 9-10) and ``DomainTowers`` (the K MLP_t^k, Eq. 11). Every module works on the
pair layout of ``model.layers`` (B users x C candidates) and selects domain weights per user.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.layers import Domains, PairInputs, PairMLP, StackedMLP, StackedPairMLP


class SharedExpert(nn.Module):
    """MLP_s(R | theta*) -> E_s (B, C, h) (Eq. 7)."""

    def __init__(self, dims_in: tuple[int, int, int], dims: tuple[int, ...]) -> None:
        super().__init__()
        self.net = PairMLP(dims_in, dims, last_act=True)

    def forward(self, x: PairInputs) -> Tensor:
        return self.net(x)


class DomainExperts(nn.Module):
    """MLP_d^k(R^k | theta_d^k) for each user's domain k -> E_d (B, C, h) (Eq. 7)."""

    def __init__(self, num_domains: int, dims_in: tuple[int, int, int], dims: tuple[int, ...]) -> None:
        super().__init__()
        self.net = StackedPairMLP(num_domains, dims_in, dims, last_act=True)

    def forward(self, x: PairInputs, domain: Domains) -> Tensor:
        return self.net(x, domain)


class DomainGate(nn.Module):
    """w_g^k = sigmoid(E_did^k . theta_g^k), a 2-vector per domain weighting E_d and E_s (Eq. 8)."""

    def __init__(self, num_domains: int, domain_dim: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.randn(num_domains, domain_dim, 2) * 0.1)

    def forward(self, e_did: Tensor, domain: Domains) -> Tensor:
        """e_did (B, d_did) -> (B, 2)."""
        return torch.sigmoid(torch.matmul(e_did.unsqueeze(1), self.theta[domain.index]).squeeze(1))  # (B, 2)


def concat_fusion(e_s: Tensor, e_d: Tensor, w: Tensor) -> Tensor:
    """Eq. 9-10: E_d <- w[0] E_d, E_s <- w[1] E_s, E_g = [E_d, E_d * E_s, E_s] -> (B, C, 3h)."""
    e_d = e_d * w[:, 0].reshape(-1, 1, 1)
    e_s = e_s * w[:, 1].reshape(-1, 1, 1)
    return torch.cat([e_d, e_d * e_s, e_s], dim=-1)


class DomainTowers(nn.Module):
    """MLP_t^k(E_g^k | theta_t^k) for each user's domain -> logits (B, C) (Eq. 11)."""

    def __init__(self, num_domains: int, in_dim: int, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.net = StackedMLP(num_domains, in_dim, dims)

    def forward(self, x: Tensor, domain: Domains) -> Tensor:
        return self.net(x, domain).squeeze(-1)  # (B, C)
