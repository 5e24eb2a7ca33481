"""NANN's adversarial robustness loss for graph search (Chen et al., CIKM 2022; beyond the paper).

The service searches an HNSW graph built on L2 distances of entity vectors and scores with the model.
The search is exact only if entities that are close in that space get close scores. FGSM finds the
worst small move of the entity-side tensors (epsilon * sign of the loss gradient, per tensor) and the
loss penalises KL(p_clean || p_perturbed) between the candidate distributions, smoothing the scorer
exactly in the space the graph is built on (the entity tensors ARE the graph vectors, concatenated).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from model.layers import MASK_VALUE


def fgsm_kl(
    score: Callable[[dict[str, Tensor]], Tensor],
    ent: dict[str, Tensor],
    clean_logits: Tensor,
    clean_loss: Tensor,
    valid: Tensor,
    epsilon: float,
) -> Tensor:
    """KL between the clean and the FGSM-perturbed candidate softmax, mean over users.

    Args:
        score: entity tensors -> logits (B, C) for the same users and domains.
        ent: the entity tensors of the candidates (C, ...), part of the autograd graph.
        clean_logits, clean_loss: (B, C) logits and the scalar loss whose gradient gives the direction.
        valid: (B, C) candidate mask.
        epsilon: L-infinity size of the perturbation.
    """
    names = list(ent)
    grads = torch.autograd.grad(clean_loss, [ent[n] for n in names], retain_graph=True, allow_unused=True)
    adv = {n: ent[n] + (epsilon * g.sign() if g is not None else 0.0) for n, g in zip(names, grads, strict=True)}
    adv_logits = score({n: adv[n] for n in names})
    fill = torch.full_like(clean_logits, MASK_VALUE)
    p_clean = torch.log_softmax(torch.where(valid, clean_logits, fill), dim=-1).detach()
    p_adv = torch.log_softmax(torch.where(valid, adv_logits, fill), dim=-1)
    return F.kl_div(p_adv, p_clean, log_target=True, reduction="batchmean")
