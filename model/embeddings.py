"""Shared embedding layer, ad network, user transformer and target attention (paper III-B, Fig. 2).

Produces, from the schema's features (Table I):

* E_u (profile), E_a (entity features + E_ac), E_seq (behaviour sequence), E_aid (entity id),
  E_did (domain) from one shared embedding layer;
* E_uee = AdNetwork(E_a), E_tran = UserTransformer(E_u, E_seq), E_att = TargetAttention(E_aid, E_seq).

Split by what changes when (the serving split of the bundle): ``user`` runs once per request,
``entity`` once per entity (precomputed at export), ``pair_inputs`` per (user, candidate).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from contracts.schema import FeatureSchema
from model.config import ModelConfig
from model.layers import PairInputs, TargetAttention, TransformerBlock, mlp

USER_OUTPUTS = ("seq_keys", "seq_vals", "seq_mask", "user_repr")
ENTITY_TENSORS = ("ent_uee", "ent_aid")


@dataclass(frozen=True)
class EntityTable:
    """The entity feature columns the model reads (data, not parameters: never checkpointed)."""

    cat: np.ndarray  # (E, Ce) int
    num: np.ndarray  # (E, Cn) float32
    entity_type: np.ndarray  # (E,) int

    @property
    def num_entities(self) -> int:
        return int(self.entity_type.shape[0])


class CategoricalEmbedding(nn.Module):
    """Every categorical column of a group in one table (offset per column) -> (N, features * dim).

    A multi-value feature (``values`` > 1: a bag of codes in consecutive columns, 0 = no value) gives
    the mean of the embeddings of its non-zero codes, zeros for an empty bag. With only
    single-value features this is the plain lookup (same parameters, same output).
    """

    offsets: Tensor  # buffer (columns,)
    bags: Tensor  # buffer (columns,): the feature each column belongs to

    def __init__(self, cardinalities: list[int], dim: int, values: list[int] | None = None) -> None:
        super().__init__()
        values = values if values is not None else [1] * len(cardinalities)
        self.cols = len(cardinalities)  # features
        self.dim = dim
        self.multi = any(v > 1 for v in values)
        offsets = np.concatenate([[0], np.cumsum(cardinalities)[:-1]]) if cardinalities else np.zeros(0)
        # a multi-value feature's columns share its table rows: repeat its offset per column
        self.register_buffer(
            "offsets", torch.as_tensor(np.repeat(offsets, values), dtype=torch.long), persistent=False
        )
        self.register_buffer(
            "bags", torch.as_tensor(np.repeat(np.arange(len(values)), values), dtype=torch.long), persistent=False
        )
        self.table = nn.Embedding(max(int(sum(cardinalities)), 1), dim)

    @property
    def out_dim(self) -> int:
        return self.cols * self.dim

    def forward(self, codes: Tensor) -> Tensor:
        if self.cols == 0:
            return codes.new_zeros((codes.shape[0], 0), dtype=torch.float32)
        emb = self.table(codes.long() + self.offsets)  # (N, columns, dim)
        if not self.multi:
            return emb.flatten(1)  # (N, cols * dim)
        present = (codes != 0).to(emb.dtype)  # (N, columns); a single-value column always counts
        single = torch.bincount(self.bags, minlength=self.cols) == 1  # (cols,)
        present = torch.where(single[self.bags], torch.ones_like(present), present)
        summed = emb.new_zeros((codes.shape[0], self.cols, self.dim)).index_add_(
            1, self.bags, emb * present.unsqueeze(-1)
        )  # (N, cols, dim)
        count = present.new_zeros((codes.shape[0], self.cols)).index_add_(1, self.bags, present)  # (N, cols)
        return (summed / count.clamp(min=1.0).unsqueeze(-1)).flatten(1)  # (N, cols * dim)


class SharedEmbeddings(nn.Module):
    """The shared embedding layer: E_u, E_a (with E_ac), E_aid / E_seq, E_did."""

    def __init__(self, schema: FeatureSchema, num_entities: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.user_cat = CategoricalEmbedding([c.cardinality for c in schema.user_categorical], cfg.cat_dim)
        self.entity_cat = CategoricalEmbedding(
            [c.cardinality for c in schema.entity_categorical], cfg.cat_dim, [c.values for c in schema.entity_categorical]
        )
        self.entity_type = nn.Embedding(schema.num_entity_types, cfg.cat_dim)  # E_ac
        self.aid = nn.Embedding(num_entities, cfg.embed_dim)  # E_aid, and E_seq through the same table
        self.did = nn.Embedding(schema.num_domains, cfg.domain_dim)  # E_did
        nn.init.normal_(self.aid.weight, std=0.05)
        self.user_dim = self.user_cat.out_dim + len(schema.user_numeric)
        self.entity_dim = self.entity_cat.out_dim + len(schema.entity_numeric) + cfg.cat_dim

    def user(self, user_cat: Tensor, user_num: Tensor) -> Tensor:
        return torch.cat([self.user_cat(user_cat), user_num], dim=-1)  # E_u (B, Du0)

    def entity(self, cat: Tensor, num: Tensor, etype: Tensor) -> Tensor:
        return torch.cat([self.entity_cat(cat), num, self.entity_type(etype.long())], dim=-1)  # E_a (C, De0)

    def sequence(self, seq: Tensor) -> tuple[Tensor, Tensor]:
        """seq (B, L) entity rows, -1 = padding -> E_seq (B, L, d), mask (B, L) float."""
        mask = (seq >= 0).to(torch.float32)
        # clamp, not index with -1: ONNX Gather would read the last row for a negative index
        emb = self.aid(seq.clamp(min=0).long()) * mask.unsqueeze(-1)
        return emb, mask


class UserTransformer(nn.Module):
    """Standard transformer over [profile token; E_seq] with padding masks -> E_tran (III-B).

    The profile E_u enters as the first token (always unmasked, so an empty history still yields a
    finite E_tran); its output position is the user representation.
    """

    def __init__(self, user_dim: int, max_len: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.profile = nn.Linear(user_dim, cfg.embed_dim)
        self.pos = nn.Parameter(torch.zeros(max_len + 1, cfg.embed_dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.embed_dim, cfg.transformer_heads, cfg.transformer_ff, cfg.dropout)
            for _ in range(cfg.transformer_layers)
        )
        self.norm = nn.LayerNorm(cfg.embed_dim)

    def forward(self, e_u: Tensor, e_seq: Tensor, seq_mask: Tensor) -> Tensor:
        tokens = torch.cat([self.profile(e_u).unsqueeze(1), e_seq], dim=1)  # (B, 1 + L, d)
        tokens = tokens + self.pos[: tokens.shape[1]]
        mask = torch.cat([torch.ones_like(seq_mask[:, :1]), seq_mask], dim=1)  # (B, 1 + L)
        for block in self.blocks:
            tokens = block(tokens, mask)
        return self.norm(tokens[:, 0])  # E_tran (B, d)


class FeatureEncoder(nn.Module):
    """Everything before the backbone: embeddings, ad network, user transformer, target attention."""

    # buffers (registered in __init__): the entity feature columns
    ent_cat: Tensor  # (E, Ce) int64
    ent_num: Tensor  # (E, Cn) float32
    ent_type: Tensor  # (E,) int64

    def __init__(self, schema: FeatureSchema, entities: EntityTable, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # np.array copies: the dataset arrays are read-only memory maps
        self.register_buffer("ent_cat", torch.from_numpy(np.array(entities.cat, dtype=np.int64)), persistent=False)
        self.register_buffer("ent_num", torch.from_numpy(np.array(entities.num, dtype=np.float32)), persistent=False)
        self.register_buffer(
            "ent_type", torch.from_numpy(np.array(entities.entity_type, dtype=np.int64)), persistent=False
        )
        self.emb = SharedEmbeddings(schema, entities.num_entities, cfg)
        self.ad_net = mlp(self.emb.entity_dim, (*cfg.ad_hidden, cfg.embed_dim))  # -> E_uee
        self.user_encoder = UserTransformer(self.emb.user_dim, schema.max_seq_len, cfg)
        self.target_attention = TargetAttention(cfg.embed_dim)

    # ---- per request ---------------------------------------------------------------------------
    def user(self, user_cat: Tensor, user_num: Tensor, seq: Tensor, domain: Tensor) -> dict[str, Tensor]:
        e_u = self.emb.user(user_cat, user_num)
        e_seq, mask = self.emb.sequence(seq)
        e_tran = self.user_encoder(e_u, e_seq, mask)
        e_did = self.emb.did(domain.long())  # (B, d_did)
        return {
            "seq_keys": self.target_attention.keys(e_seq),  # (B, L, d)
            "seq_vals": e_seq,  # (B, L, d)
            "seq_mask": mask,  # (B, L)
            "user_repr": torch.cat([e_tran, e_did], dim=-1),  # (B, d + d_did)
        }

    # ---- per entity (precomputed at export) ----------------------------------------------------
    def entity(self, rows: Tensor) -> dict[str, Tensor]:
        rows = rows.long()
        e_a = self.emb.entity(self.ent_cat[rows], self.ent_num[rows], self.ent_type[rows])
        return {"ent_uee": self.ad_net(e_a), "ent_aid": self.emb.aid(rows)}  # (C, d) each

    # ---- per pair ------------------------------------------------------------------------------
    def pair_inputs(self, user: dict[str, Tensor], ent: dict[str, Tensor]) -> PairInputs:
        e_att = self.target_attention(ent["ent_aid"], user["seq_keys"], user["seq_vals"], user["seq_mask"])
        return PairInputs(
            user=user["user_repr"],
            entity=torch.cat([ent["ent_uee"], ent["ent_aid"]], dim=-1),
            pair=e_att,
        )

    @property
    def pair_dims(self) -> tuple[int, int, int]:
        d = self.cfg.embed_dim
        return d + self.cfg.domain_dim, 2 * d, d
