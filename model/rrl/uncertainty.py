"""Uncertainty weighting of the auxiliary losses (paper III-D-4, Eq. 25; Kendall et al. 2018).

L_final = L_ce + sum_i (1 / (2 sigma_i^2) L_i + log sigma_i) over {L_s, L_d, L_wd, L_ortho}, sigma_i
learnable. Parametrised by s_i = log sigma_i^2 (so 1/(2 sigma^2) = exp(-s)/2, log sigma = s/2), which
is smooth and positive by construction. s is clamped to a range: the adversarial terms can be negative
and then the objective has no minimum in sigma. Switched off, every auxiliary loss gets the fixed
weight of V-A3 (0.01).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class UncertaintyWeighting(nn.Module):
    """Inputs: dict name -> scalar loss (only the present ones). Output: (weighted sum, weights by name)."""

    def __init__(
        self,
        names: tuple[str, ...],
        *,
        learnable: bool,
        fixed_weight: float = 0.01,
        log_var_range: tuple[float, float] = (-4.0, 6.0),
    ) -> None:
        super().__init__()
        self.names = names
        self.learnable = learnable
        self.fixed_weight = fixed_weight
        self.lo, self.hi = log_var_range
        if learnable:
            # start at the fixed weight (1/(2 sigma^2) = fixed_weight), i.e. where the ablation without UWL
            # sits, and let each weight move from there
            init = math.log(1.0 / (2.0 * fixed_weight))
            self.log_var = nn.Parameter(torch.full((len(names),), init))

    def forward(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        total: Tensor | None = None
        weights: dict[str, float] = {}
        for i, name in enumerate(self.names):
            if name not in losses:
                continue
            if self.learnable:
                s = self.log_var[i].clamp(self.lo, self.hi)
                term = 0.5 * torch.exp(-s) * losses[name] + 0.5 * s
                weights[name] = float(0.5 * torch.exp(-s.detach()))
            else:
                term = self.fixed_weight * losses[name]
                weights[name] = self.fixed_weight
            total = term if total is None else total + term
        if total is None:
            total = torch.zeros(())
        return total, weights
