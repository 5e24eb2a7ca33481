"""Multi-view Wasserstein distribution learning (paper III-D-2, Algorithm 3, Eqs. 18-23).

T = K projection layers P^t map the shared representation E_s into K "domain views"; K-1 critics
C^t (WGAN-GP, Gulrajani et al. 2017) estimate the Wasserstein distance between consecutive views
E_p^t and E_p^{t+1}. Each critic score is weighted by the domain sizes of Eq. 20: an example of
domain k scored in view t counts 1/|D^k| when t = k and 1/(|D| - |D^k|) otherwise (|D^k| counted in
the batch), so within a view the own domain and the other domains weigh equally however skewed the
traffic is.

The minimax of Eq. 22 runs in one backward pass: the critics read the views through a gradient
reversal layer, so the critics ascend the distance estimate W^t (minus the gradient penalty) while
the projections and the shared expert descend it. The penalty is computed on detached
interpolates (Eq. 23), as in WGAN-GP, so it constrains only the critics.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.layers import GradientReversal, mlp


def gradient_penalty(critic: nn.Module, a: Tensor, b: Tensor, xi: Tensor | None = None) -> Tensor:
    """mean_i (||grad_x C(x_i)||_2 - 1)^2 at x = xi a + (1 - xi) b (Eq. 23); a, b (N, p), xi (N, 1)."""
    if xi is None:
        xi = torch.rand(a.shape[0], 1, device=a.device, dtype=a.dtype)
    train_critic = torch.is_grad_enabled()
    with torch.enable_grad():  # the penalty is a gradient, also when the caller evaluates under no_grad
        x = (xi * a.detach() + (1.0 - xi) * b.detach()).requires_grad_(True)
        out = critic(x)
        (grad,) = torch.autograd.grad(out.sum(), x, create_graph=train_critic)
    return ((grad.norm(dim=1) - 1.0) ** 2).mean()


def view_weights(domain: Tensor, view: int) -> Tensor:
    """Eq. 20 weights (N,) of each example in view ``view``: 1/|D^k| if k = view else 1/(|D| - |D^k|)."""
    own = domain == view
    n_own = own.sum().clamp(min=1).to(torch.float32)
    n_other = (~own).sum().clamp(min=1).to(torch.float32)
    return torch.where(own, 1.0 / n_own, 1.0 / n_other)


class MultiViewWasserstein(nn.Module):
    """Inputs: E_s (N, h) of the positive pairs and their domains (N,).

    Returns a dict: ``loss`` (the critics' objective -W + gp_weight * GP summed over t, what the
    optimiser descends; the GRL turns it into +W for the shared expert), ``distance`` (sum_t W^t, the
    estimated distance the shared expert shrinks) and ``gp``.
    """

    def __init__(
        self,
        in_dim: int,
        num_domains: int,
        *,
        projection_dim: int = 64,
        critic_dims: tuple[int, ...] = (128, 64, 1),
        gp_weight: float = 10.0,
        grl_lambda: float = 1.0,
    ) -> None:
        super().__init__()
        self.projections = nn.ModuleList(nn.Linear(in_dim, projection_dim) for _ in range(num_domains))
        self.critics = nn.ModuleList(mlp(projection_dim, critic_dims) for _ in range(num_domains - 1))
        self.grl = GradientReversal(grl_lambda)
        self.gp_weight = gp_weight

    def forward(self, e_s: Tensor, domain: Tensor) -> dict[str, Tensor]:
        views = [p(e_s) for p in self.projections]  # T x (N, p)  Eq. 18
        zero = e_s.new_zeros(())
        distance, gp_total = zero, zero
        for t, critic in enumerate(self.critics):
            c_t = critic(self.grl(views[t])).squeeze(-1)  # (N,)  Eq. 19
            c_t1 = critic(self.grl(views[t + 1])).squeeze(-1)
            s_t = (c_t * view_weights(domain, t)).sum()  # Eq. 20
            s_t1 = (c_t1 * view_weights(domain, t + 1)).sum()
            distance = distance + (s_t1 - s_t)
            gp_total = gp_total + gradient_penalty(critic, views[t], views[t + 1])
        return {"loss": -distance + self.gp_weight * gp_total, "distance": distance.detach(), "gp": gp_total.detach()}
