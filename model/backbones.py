"""The paper's backbone, its six baselines (V-A2) and the two-tower model, behind one interface.

Every backbone maps ``PairInputs`` (R split by dependency, see ``model.layers``) and each user's
domain to logits (B, C) plus auxiliary representations for the training-only losses. They differ
only in this part: embeddings, ad network, user transformer and target attention are shared
(``model.embeddings.FeatureEncoder``), as in the paper's V-A3. ``build_model`` selects the class by
``Architecture`` (an Enum), and ``DeepMatchingModel`` / ``TwoTowerModel`` expose the same three
calls the trainer, evaluator and exporter use: ``user`` (per request), ``entity`` (per entity),
``score`` (per pair).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contracts.schema import FeatureSchema
from model.config import Architecture, ModelConfig
from model.embeddings import ENTITY_TENSORS, USER_OUTPUTS, EntityTable, FeatureEncoder
from model.experts import DomainExperts, DomainGate, DomainTowers, SharedExpert, concat_fusion
from model.layers import Domains, PairInputs, PairMLP, SplitLinear, StackedPairMLP, StackedSplitLinear, mlp

Aux = dict[str, Tensor]


class Backbone(nn.Module):
    """Hybrid-expert backbone (Eqs. 5-11, Algorithm 1): MLP_s, K MLP_d, K gates, CONCAT fusion, K towers."""

    def __init__(self, num_domains: int, dims_in: tuple[int, int, int], cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.expert_dims[-1]
        self.shared = SharedExpert(dims_in, cfg.expert_dims)
        self.specific = DomainExperts(num_domains, dims_in, cfg.expert_dims)
        self.gate = DomainGate(num_domains, cfg.domain_dim)
        self.towers = DomainTowers(num_domains, 3 * h, cfg.tower_dims)

    def forward(self, x: PairInputs, domain: Domains, e_did: Tensor) -> tuple[Tensor, Aux]:
        e_s = self.shared(x)  # (B, C, h)
        e_d = self.specific(x, domain)  # (B, C, h)
        w = self.gate(e_did, domain)  # (B, 2)
        logits = self.towers(concat_fusion(e_s, e_d, w), domain)  # (B, C)
        return logits, {"shared": e_s, "specific": e_d, "gate": w}


class DNN(nn.Module):
    """One MLP for all domains (the domain enters only as the E_did feature)."""

    def __init__(self, num_domains: int, dims_in: tuple[int, int, int], cfg: ModelConfig) -> None:
        super().__init__()
        self.net = PairMLP(dims_in, (*cfg.expert_dims, *cfg.tower_dims), last_act=False)

    def forward(self, x: PairInputs, domain: Domains, e_did: Tensor) -> tuple[Tensor, Aux]:
        return self.net(x).squeeze(-1), {}


class SharedBottom(nn.Module):
    """Shared bottom MLP, one tower per domain (Caruana 1997)."""

    def __init__(self, num_domains: int, dims_in: tuple[int, int, int], cfg: ModelConfig) -> None:
        super().__init__()
        self.bottom = PairMLP(dims_in, cfg.expert_dims, last_act=True)
        self.towers = DomainTowers(num_domains, cfg.expert_dims[-1], cfg.tower_dims)

    def forward(self, x: PairInputs, domain: Domains, e_did: Tensor) -> tuple[Tensor, Aux]:
        return self.towers(self.bottom(x), domain), {}


class CrossStitch(nn.Module):
    """K columns whose hidden layers are mixed by learned K x K cross-stitch units (Misra et al. 2016)."""

    def __init__(self, num_domains: int, dims_in: tuple[int, int, int], cfg: ModelConfig) -> None:
        super().__init__()
        k = num_domains
        self.num_domains = k
        self.first = nn.ModuleList(SplitLinear(dims_in, cfg.expert_dims[0]) for _ in range(k))
        self.upper = nn.ModuleList(
            nn.ModuleList(nn.Linear(a, b) for _ in range(k)) for a, b in zip(cfg.expert_dims, cfg.expert_dims[1:], strict=False)
        )
        # start near independent columns: 0.9 on the diagonal, the rest shared equally
        init = torch.full((k, k), 0.1 / max(k - 1, 1)) + torch.eye(k) * (0.9 - 0.1 / max(k - 1, 1))
        self.stitch = nn.ParameterList(nn.Parameter(init.clone()) for _ in cfg.expert_dims)
        self.towers = DomainTowers(k, cfg.expert_dims[-1], cfg.tower_dims)

    def forward(self, x: PairInputs, domain: Domains, e_did: Tensor) -> tuple[Tensor, Aux]:
        h = torch.stack([torch.relu(f(x)) for f in self.first])  # (K, B, C, h)
        h = torch.einsum("kj,jbch->kbch", self.stitch[0], h)
        for layers, stitch in zip(self.upper, list(self.stitch)[1:], strict=True):
            # ModuleList is not generic: each item of self.upper is itself a ModuleList of K Linear
            h = torch.stack([torch.relu(lin(h[j])) for j, lin in enumerate(cast(nn.ModuleList, layers))])  # (K, B, C, h')
            h = torch.einsum("kj,jbch->kbch", stitch, h)
        onehot = F.one_hot(domain.index, self.num_domains).to(h.dtype)  # (B, K)
        own = torch.einsum("bk,kbch->bch", onehot, h)  # each user's own domain column
        return self.towers(own, domain), {}


class MMoE(nn.Module):
    """Shared experts mixed by one softmax gate per domain (Ma et al. 2018)."""

    def __init__(self, num_domains: int, dims_in: tuple[int, int, int], cfg: ModelConfig) -> None:
        super().__init__()
        self.experts = nn.ModuleList(PairMLP(dims_in, cfg.expert_dims, last_act=True) for _ in range(cfg.num_experts))
        self.gate = StackedSplitLinear(num_domains, dims_in, cfg.num_experts)
        self.towers = DomainTowers(num_domains, cfg.expert_dims[-1], cfg.tower_dims)

    def mix(self, x: PairInputs, domain: Domains) -> Tensor:
        return torch.softmax(self.gate(x, domain), dim=-1)  # (B, C, E)

    def forward(self, x: PairInputs, domain: Domains, e_did: Tensor) -> tuple[Tensor, Aux]:
        experts = torch.stack([e(x) for e in self.experts], dim=-2)  # (B, C, E, h)
        w = self.mix(x, domain)
        fused = (experts * w.unsqueeze(-1)).sum(-2)  # (B, C, h)
        return self.towers(fused, domain), {"gate": w}


def smooth_step(t: Tensor, gamma: float = 1.0) -> Tensor:
    """DSelect-k's cubic smooth-step: 0 below -gamma/2, 1 above gamma/2, C^1 in between."""
    mid = -2.0 / gamma**3 * t**3 + 1.5 / gamma * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), mid))


class DSelectK(MMoE):
    """MMoE with DSelect-k gates (Hazimeh et al. 2021): k differentiable binary-encoded selectors per domain."""

    bits: Tensor  # buffer (n, m)

    def __init__(self, num_domains: int, dims_in: tuple[int, int, int], cfg: ModelConfig) -> None:
        super().__init__(num_domains, dims_in, cfg)
        n = cfg.num_experts
        self.k = cfg.dselect_k
        self.m = max(1, math.ceil(math.log2(n)))
        self.gate = StackedSplitLinear(num_domains, dims_in, self.k * self.m + self.k)
        bits = torch.tensor([[(i >> j) & 1 for j in range(self.m)] for i in range(n)], dtype=torch.float32)
        self.register_buffer("bits", bits, persistent=False)  # (n, m) binary code of each expert

    def mix(self, x: PairInputs, domain: Domains) -> Tensor:
        out = self.gate(x, domain)  # (B, C, k*m + k)
        b, c = out.shape[:2]
        z = smooth_step(out[..., : self.k * self.m].reshape(b, c, self.k, 1, self.m))  # (B, C, k, 1, m)
        # selector i = prod_j (S(z_j) if bit j of i else 1 - S(z_j)) -> (B, C, k, n)
        sel = torch.where(self.bits > 0, z, 1.0 - z).prod(-1)
        alpha = torch.softmax(out[..., self.k * self.m :], dim=-1)  # (B, C, k)
        return (sel * alpha.unsqueeze(-1)).sum(-2)  # (B, C, n)


class PLE(nn.Module):
    """Customised gate control (one extraction level of PLE, Tang et al. 2020): shared + domain experts."""

    def __init__(self, num_domains: int, dims_in: tuple[int, int, int], cfg: ModelConfig) -> None:
        super().__init__()
        n = max(1, cfg.num_experts // 2)  # half shared, half per domain (2 + 2 by default)
        self.shared = nn.ModuleList(PairMLP(dims_in, cfg.expert_dims, last_act=True) for _ in range(n))
        self.specific = nn.ModuleList(StackedPairMLP(num_domains, dims_in, cfg.expert_dims) for _ in range(n))
        self.gate = StackedSplitLinear(num_domains, dims_in, 2 * n)
        self.towers = DomainTowers(num_domains, cfg.expert_dims[-1], cfg.tower_dims)

    def forward(self, x: PairInputs, domain: Domains, e_did: Tensor) -> tuple[Tensor, Aux]:
        experts = [e(x, domain) for e in self.specific] + [e(x) for e in self.shared]
        stacked = torch.stack(experts, dim=-2)  # (B, C, 2n, h)
        w = torch.softmax(self.gate(x, domain), dim=-1)  # (B, C, 2n)
        fused = (stacked * w.unsqueeze(-1)).sum(-2)
        return self.towers(fused, domain), {"gate": w}


BackboneFactory = Callable[[int, tuple[int, int, int], ModelConfig], nn.Module]

BACKBONES: dict[Architecture, BackboneFactory] = {
    Architecture.BACKBONE: Backbone,
    Architecture.DNN: DNN,
    Architecture.SHARED_BOTTOM: SharedBottom,
    Architecture.CROSS_STITCH: CrossStitch,
    Architecture.MMOE: MMoE,
    Architecture.DSELECT_K: DSelectK,
    Architecture.PLE: PLE,
}


class DeepMatchingModel(nn.Module):
    """Feature encoder + a deep backbone: the model the pair scorer serves (kind "deep")."""

    kind = "deep"
    user_output_names: tuple[str, ...] = USER_OUTPUTS
    entity_tensor_names: tuple[str, ...] = ENTITY_TENSORS

    def __init__(self, schema: FeatureSchema, entities: EntityTable, cfg: ModelConfig, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        self.domain_dim = cfg.domain_dim
        self.num_domains = schema.num_domains
        self.encoder = FeatureEncoder(schema, entities, cfg)
        self.backbone = BACKBONES[arch](schema.num_domains, self.encoder.pair_dims, cfg)

    def user(self, user_cat: Tensor, user_num: Tensor, seq: Tensor, domain: Tensor) -> dict[str, Tensor]:
        return self.encoder.user(user_cat, user_num, seq, domain)

    def entity(self, rows: Tensor) -> dict[str, Tensor]:
        return self.encoder.entity(rows)

    def score(self, user: dict[str, Tensor], ent: dict[str, Tensor], domain: Tensor) -> tuple[Tensor, Aux]:
        """Logits (B, C) of every user against every candidate, in each user's domain."""
        x = self.encoder.pair_inputs(user, ent)
        e_did = user["user_repr"][:, -self.domain_dim :]
        return self.backbone(x, Domains(domain, self.num_domains), e_did)

    @staticmethod
    def vectors(ent: dict[str, Tensor]) -> Tensor:
        """The L2 space of the graph: [E_uee, E_aid], exactly the entity-side input of the scorer."""
        return torch.cat([ent["ent_uee"], ent["ent_aid"]], dim=-1)


class TwoTowerModel(nn.Module):
    """User tower and entity tower over the same features, score = inner product (kind "two-tower")."""

    kind = "two-tower"
    user_output_names: tuple[str, ...] = ("user_repr",)
    entity_tensor_names: tuple[str, ...] = ("ent_vec",)

    def __init__(self, schema: FeatureSchema, entities: EntityTable, cfg: ModelConfig, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = FeatureEncoder(schema, entities, cfg)
        d = cfg.embed_dim
        self.user_tower = mlp(d + cfg.domain_dim, (*cfg.tower_dims[:-1], cfg.two_tower_dim))
        self.entity_tower = mlp(2 * d, (*cfg.tower_dims[:-1], cfg.two_tower_dim))

    def user(self, user_cat: Tensor, user_num: Tensor, seq: Tensor, domain: Tensor) -> dict[str, Tensor]:
        enc = self.encoder
        e_u = enc.emb.user(user_cat, user_num)
        e_seq, mask = enc.emb.sequence(seq)
        e_tran = enc.user_encoder(e_u, e_seq, mask)
        e_did = enc.emb.did(domain.long())
        return {"user_repr": self.user_tower(torch.cat([e_tran, e_did], dim=-1))}  # (B, D)

    def entity(self, rows: Tensor) -> dict[str, Tensor]:
        ent = self.encoder.entity(rows)
        return {"ent_vec": self.entity_tower(torch.cat([ent["ent_uee"], ent["ent_aid"]], dim=-1))}  # (C, D)

    def score(self, user: dict[str, Tensor], ent: dict[str, Tensor], domain: Tensor) -> tuple[Tensor, Aux]:
        if ent["ent_vec"].dim() == 3:  # per-user candidates (B, C, D)
            return torch.einsum("bd,bcd->bc", user["user_repr"], ent["ent_vec"]), {}
        return user["user_repr"] @ ent["ent_vec"].t(), {}  # (B, C)

    @staticmethod
    def vectors(ent: dict[str, Tensor]) -> Tensor:
        return ent["ent_vec"]


MatchingModel = DeepMatchingModel | TwoTowerModel


def build_model(schema: FeatureSchema, entities: EntityTable, cfg: ModelConfig, arch: Architecture) -> MatchingModel:
    """The network for ``arch``; the Enum decides, and every member has a class."""
    if arch is Architecture.TWO_TOWER:
        return TwoTowerModel(schema, entities, cfg, arch)
    if arch not in BACKBONES:
        raise ValueError(f"no backbone registered for architecture {arch.value!r}")
    return DeepMatchingModel(schema, entities, cfg, arch)
