"""Each auxiliary loss on a tiny case with a known answer (paper III-D, Eqs. 13-25; NANN FGSM)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.rrl.adversarial import fgsm_kl
from model.rrl.dal import DomainAdversarialLoss
from model.rrl.orthogonal import OrthogonalityLoss
from model.rrl.uncertainty import UncertaintyWeighting
from model.rrl.wasserstein import MultiViewWasserstein, gradient_penalty, view_weights


def _orthonormal(n: int, h: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, h, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q  # (n, h) with orthonormal columns


def test_orthogonality_eq24_is_zero_when_cross_correlation_is_identity() -> None:
    q = _orthonormal(8, 4) * math.sqrt(8)  # E^T E / n = I
    dom = torch.zeros(8, dtype=torch.long)
    assert float(OrthogonalityLoss(1, "paper")(q, q, dom)) == pytest.approx(0.0, abs=1e-12)
    # and the raw product of an orthonormal Q is I * n away from it: ||I/8 - I||^2 = 4 * (7/8)^2
    assert float(OrthogonalityLoss(1, "paper")(q / math.sqrt(8), q / math.sqrt(8), dom)) == pytest.approx(4 * 49 / 64)


def test_orthogonality_eq24_on_mutually_orthogonal_inputs_is_h_per_domain_and_soft_version_zero() -> None:
    # E_s and E_d span orthogonal subspaces: E_s^T E_d = 0. Eq. 24 as printed then gives ||-I||_F^2 = h.
    q = _orthonormal(8, 6)
    e_s, e_d = q[:, :3], q[:, 3:]
    dom = torch.zeros(8, dtype=torch.long)
    assert float(OrthogonalityLoss(1, "paper")(e_s, e_d, dom)) == pytest.approx(3.0, abs=1e-10)
    assert float(OrthogonalityLoss(1, "difference")(e_s, e_d, dom)) == pytest.approx(0.0, abs=1e-12)
    # two domains, orthogonal within each domain's rows: the paper form sums h per domain
    q0, q1 = _orthonormal(4, 4, seed=1), _orthonormal(4, 4, seed=2)
    e_s2, e_d2 = torch.cat([q0[:, :2], q1[:, :2]]), torch.cat([q0[:, 2:], q1[:, 2:]])
    dom2 = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert float(OrthogonalityLoss(2, "paper")(e_s2, e_d2, dom2)) == pytest.approx(4.0, abs=1e-10)
    assert float(OrthogonalityLoss(2, "difference")(e_s2, e_d2, dom2)) == pytest.approx(0.0, abs=1e-12)


def test_orthogonality_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        OrthogonalityLoss(2, "bogus")


def test_gradient_penalty_is_zero_for_unit_norm_linear_critic_and_one_for_norm_two() -> None:
    critic = nn.Linear(5, 1)
    with torch.no_grad():
        critic.weight.copy_(torch.tensor([[0.6, 0.8, 0.0, 0.0, 0.0]]))  # ||w|| = 1: 1-Lipschitz
    a, b = torch.randn(10, 5), torch.randn(10, 5)
    assert float(gradient_penalty(critic, a, b).detach()) == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        critic.weight.mul_(2.0)
    assert float(gradient_penalty(critic, a, b).detach()) == pytest.approx(1.0, abs=1e-6)


def test_eq20_weights_average_each_side_of_a_view() -> None:
    dom = torch.tensor([0, 0, 0, 1, 2, 2])
    w = view_weights(dom, 0)
    torch.testing.assert_close(w, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3]))
    w1 = view_weights(dom, 1)
    assert float(w1[dom == 1].sum()) == pytest.approx(1.0) and float(w1[dom != 1].sum()) == pytest.approx(1.0)


def test_mvwdl_critics_ascend_w_and_projections_descend_its_magnitude() -> None:
    torch.manual_seed(0)
    mv = MultiViewWasserstein(6, 3, projection_dim=4, critic_dims=(8, 1), gp_weight=0.0)
    e_s = torch.randn(12, 6)
    dom = torch.arange(12) % 3
    out = mv(e_s, dom)
    assert out["loss"].shape == () and len(mv.critics) == 2 and len(mv.projections) == 3
    out["loss"].backward()
    got_proj = mv.projections[0].weight.grad.clone()
    got_critic = mv.critics[0][0].weight.grad.clone()
    mv.zero_grad()
    # reference by hand for t = 0 (projection 0 only feeds critic 0)
    views = [p(e_s) for p in mv.projections]

    def w(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ca, cb = mv.critics[0](a).squeeze(-1), mv.critics[0](b).squeeze(-1)
        return (cb * view_weights(dom, 1)).sum() - (ca * view_weights(dom, 0)).sum()

    (g_proj,) = torch.autograd.grad(w(views[0], views[1]).abs(), mv.projections[0].weight)
    (g_critic,) = torch.autograd.grad(-w(views[0].detach(), views[1].detach()), mv.critics[0][0].weight)
    torch.testing.assert_close(got_proj, g_proj)  # encoder side: descend |W|
    torch.testing.assert_close(got_critic, g_critic)  # critic side: ascend W


def test_dal_shared_classifier_gradient_is_reversed_for_the_expert() -> None:
    torch.manual_seed(0)
    dal = DomainAdversarialLoss(6, 3, hidden=8)
    dal.eval()  # freeze the spectral-norm power iteration so both passes use the same weights
    e_s = torch.randn(9, 6, requires_grad=True)
    e_d = torch.randn(9, 6, requires_grad=True)
    dom = torch.arange(9) % 3
    loss_s, loss_d = dal(e_s, e_d, dom)
    (g_rev,) = torch.autograd.grad(loss_s, e_s)
    plain = F.cross_entropy(dal.shared_classifier(e_s), dom)
    (g_plain,) = torch.autograd.grad(plain, e_s)
    torch.testing.assert_close(g_rev, -g_plain)
    (g_d,) = torch.autograd.grad(loss_d, e_d)
    assert g_d.abs().sum() > 0
    assert loss_s.item() > 0 and loss_d.item() > 0


def test_spectral_norm_bounds_the_shared_classifier() -> None:
    torch.manual_seed(0)
    dal = DomainAdversarialLoss(6, 3, hidden=8)
    dal.train()
    for _ in range(20):  # power iterations converge
        dal.shared_classifier(torch.randn(4, 6))
    w = dal.shared_classifier[0].weight
    assert float(torch.linalg.matrix_norm(w.detach(), ord=2)) == pytest.approx(1.0, rel=0.05)


def test_uwl_fixed_weights_and_learnable_eq25() -> None:
    losses = {"dal_shared": torch.tensor(2.0), "ortho": torch.tensor(3.0)}
    fixed = UncertaintyWeighting(("dal_shared", "dal_specific", "wasserstein", "ortho"), learnable=False)
    total, w = fixed(losses)
    assert float(total) == pytest.approx(0.05) and w == {"dal_shared": 0.01, "ortho": 0.01}
    uwl = UncertaintyWeighting(("dal_shared", "ortho"), learnable=True, fixed_weight=0.01)
    total, w = uwl(losses)
    s = math.log(50.0)  # starts where the fixed weight is: 1/(2 sigma^2) = 0.01
    assert w["ortho"] == pytest.approx(0.01)
    assert float(total) == pytest.approx(0.01 * 5.0 + s)  # sum of 1/(2 s^2) L + log sigma
    total.backward()
    # d/ds [exp(-s)/2 L + s/2] = -w L + 1/2 per loss
    torch.testing.assert_close(uwl.log_var.grad, torch.tensor([-0.02 + 0.5, -0.03 + 0.5]))


def test_fgsm_kl_is_zero_without_perturbation_and_positive_with() -> None:
    torch.manual_seed(0)
    user = torch.randn(3, 4)
    ent = {"v": torch.randn(5, 4, requires_grad=True)}
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh())

    def score(e: dict[str, torch.Tensor]) -> torch.Tensor:
        return user @ net(e["v"]).t()

    logits = score(ent)
    loss = F.cross_entropy(logits, torch.tensor([0, 1, 2]))
    valid = torch.ones(3, 5, dtype=torch.bool)
    assert float(fgsm_kl(score, ent, logits, loss, valid, 0.0)) == pytest.approx(0.0, abs=1e-7)
    kl = fgsm_kl(score, ent, logits, loss, valid, 0.3)
    assert float(kl) > 1e-4
    kl.backward()
    assert net[0].weight.grad is not None
