"""Multi-view Wasserstein distribution learning (paper III-D-2, Algorithm 3, Eqs. 18-23).

T = K projection layers P^t map the shared representation E_s into K "domain views"; K-1 critics
C^t (WGAN-GP, Gulrajani et al. 2017) estimate the Wasserstein distance between consecutive views
E_p^t and E_p^{t+1}. Each critic score is weighted by the domain sizes of Eq. 20: an example of
domain k scored in view t counts 1/|D^k| when t = k and 1/(|D| - |D^k|) otherwise (|D^k| counted in
the batch), so within a view the own domain and the other domains weigh equally however skewed the
traffic is.

The minimax of Eq. 22 runs in one backward pass as two terms. The critics ascend the distance
estimate W^t minus the gradient penalty on *detached* views (only critic parameters move). The
projections and the shared expert descend |W^t| through the critics with *frozen* parameters. Both
views are produced by learnable projections here (unlike a GAN, where one side is real data), so
descending the signed estimate W^t has no lower bound: with a gradient-reversal formulation the
projections ran W^t to -3e5 within 400 steps on the small preset and took the shared expert with
them (Recall-all@200 0.15 -> 0.05). |W^t| is minimised at W^t = 0, the aligned views Eq. 22 asks for.
The penalty is computed on detached interpolates (Eq. 23), as in WGAN-GP.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.layers import mlp


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

    Returns a dict: ``loss`` (critics: -W + gp_weight * GP on detached views; encoder: |W| through
    frozen critics; summed over t), ``distance`` (sum_t W^t, the critics' estimate) and ``gp``.
    """

    def __init__(
        self,
        in_dim: int,
        num_domains: int,
        *,
        projection_dim: int = 64,
        critic_dims: tuple[int, ...] = (128, 64, 1),
        gp_weight: float = 10.0,
    ) -> None:
        super().__init__()
        self.projections = nn.ModuleList(nn.Linear(in_dim, projection_dim) for _ in range(num_domains))
        self.critics = nn.ModuleList(mlp(projection_dim, critic_dims) for _ in range(num_domains - 1))
        self.gp_weight = gp_weight

    @staticmethod
    def estimate(critic: nn.Module, a: Tensor, b: Tensor, domain: Tensor, t: int, *, frozen: bool) -> Tensor:
        """W^t = sum_i s^{t+1,i} - sum_i s^{t,i} (Eqs. 19-20, 22) for views a = E_p^t, b = E_p^{t+1}."""
        if frozen:  # gradients reach the views, not the critic
            state = {n: p.detach() for n, p in critic.named_parameters()}
            c_a = torch.func.functional_call(critic, state, (a,)).squeeze(-1)
            c_b = torch.func.functional_call(critic, state, (b,)).squeeze(-1)
        else:
            c_a, c_b = critic(a).squeeze(-1), critic(b).squeeze(-1)
        return (c_b * view_weights(domain, t + 1)).sum() - (c_a * view_weights(domain, t)).sum()

    def forward(self, e_s: Tensor, domain: Tensor) -> dict[str, Tensor]:
        views = [p(e_s) for p in self.projections]  # T x (N, p)  Eq. 18
        zero = e_s.new_zeros(())
        critic_loss, encoder_loss, distance, gp_total = zero, zero, zero, zero
        for t, critic in enumerate(self.critics):
            a, b = views[t], views[t + 1]
            w_c = self.estimate(critic, a.detach(), b.detach(), domain, t, frozen=False)
            gp = gradient_penalty(critic, a, b)
            critic_loss = critic_loss - w_c + self.gp_weight * gp
            encoder_loss = encoder_loss + self.estimate(critic, a, b, domain, t, frozen=True).abs()
            distance = distance + w_c.detach()
            gp_total = gp_total + gp.detach()
        return {"loss": critic_loss + encoder_loss, "distance": distance, "gp": gp_total}
