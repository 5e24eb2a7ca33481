"""Shape and gradient checks of the model's building blocks and of every architecture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contracts.schema import CategoricalFeature, FeatureSchema, NumericFeature
from model.backbones import build_model, smooth_step
from model.config import Architecture, ModelConfig
from model.embeddings import EntityTable
from model.layers import (
    Domains,
    GradientReversal,
    PairInputs,
    SplitLinear,
    StackedSplitLinear,
    TargetAttention,
    TransformerBlock,
)

TINY = ModelConfig(
    embed_dim=8, cat_dim=4, domain_dim=4, ad_hidden=(16,), transformer_heads=2, transformer_ff=16,
    expert_dims=(16, 8), tower_dims=(8, 1), num_experts=4, dselect_k=2, two_tower_dim=8,
)


def _schema(k: int = 3) -> FeatureSchema:
    return FeatureSchema(
        domains=[f"d{i}" for i in range(k)],
        entity_types=["item", "shop"],
        user_categorical=[CategoricalFeature(name="age", cardinality=5)],
        user_numeric=[NumericFeature(name="act")],
        entity_categorical=[CategoricalFeature(name="cat", cardinality=7)],
        entity_numeric=[NumericFeature(name="pop")],
        max_seq_len=6,
    )


def _entities(n: int = 40, seed: int = 0) -> EntityTable:
    rng = np.random.default_rng(seed)
    return EntityTable(rng.integers(0, 7, (n, 1)), rng.standard_normal((n, 1)).astype(np.float32), rng.integers(0, 2, n))


def _pair(b: int = 5, c: int = 7, dims: tuple[int, int, int] = (3, 4, 2)) -> PairInputs:
    g = torch.Generator().manual_seed(0)
    return PairInputs(
        torch.randn(b, dims[0], generator=g), torch.randn(c, dims[1], generator=g), torch.randn(b, c, dims[2], generator=g)
    )


def test_split_linear_equals_linear_over_concatenated_inputs() -> None:
    x = _pair()
    layer = SplitLinear((3, 4, 2), 6)
    b, c = x.pair.shape[:2]
    full = torch.cat([x.user.unsqueeze(1).expand(b, c, 3), x.entity.unsqueeze(0).expand(b, c, 4), x.pair], dim=-1)
    torch.testing.assert_close(layer(x), layer.linear(full))


def test_stacked_layer_grouped_path_equals_gather_path_and_per_domain_layers() -> None:
    x = _pair(b=6)
    layer = StackedSplitLinear(3, (3, 4, 2), 5)
    dom_sorted = torch.tensor([0, 0, 1, 2, 2, 2])
    grouped = Domains(dom_sorted, 3)
    assert grouped.counts == [2, 1, 3]
    gathered = Domains(torch.tensor([0, 0, 1, 2, 2, 2]), 3)
    gathered.counts = None  # force the per-user gather path (what the ONNX graph uses)
    torch.testing.assert_close(layer(x, grouped), layer(x, gathered))
    ref = SplitLinear((3, 4, 2), 5)
    with torch.no_grad():
        ref.linear.weight.copy_(layer.weight[1].t())
        ref.linear.bias.copy_(layer.bias[1])
    torch.testing.assert_close(layer(x, grouped)[2], ref(x)[2])


def test_gradient_reversal_flips_the_sign() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    (GradientReversal(0.5)(x) * torch.arange(3.0)).sum().backward()
    torch.testing.assert_close(x.grad, -0.5 * torch.arange(3.0).expand(4, 3))


def test_target_attention_ignores_padding_and_gives_zero_for_empty_history() -> None:
    att = TargetAttention(4)
    vals = torch.randn(2, 5, 4)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.float32)
    q = torch.randn(3, 4)
    out = att(q, att.keys(vals), vals, mask)
    assert out.shape == (2, 3, 4)
    assert torch.all(out[1] == 0)
    vals2 = vals.clone()
    vals2[0, :2] = 100.0  # change padded positions only
    torch.testing.assert_close(att(q, att.keys(vals2), vals2, mask)[0], out[0])


def test_transformer_block_ignores_padded_tokens() -> None:
    block = TransformerBlock(8, 2, 16)
    x = torch.randn(1, 4, 8)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    y = block(x, mask)
    x2 = x.clone()
    x2[0, 1] = 50.0
    torch.testing.assert_close(block(x2, mask)[0, [0, 2, 3]], y[0, [0, 2, 3]])


def test_smooth_step_endpoints_and_midpoint() -> None:
    t = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    torch.testing.assert_close(smooth_step(t), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


@pytest.mark.parametrize("arch", list(Architecture))
def test_every_architecture_scores_pairs_with_gradients(arch: Architecture) -> None:
    torch.manual_seed(0)
    schema = _schema()
    model = build_model(schema, _entities(), TINY, arch)
    b, c = 5, 9
    user = model.user(
        torch.randint(0, 5, (b, 1)), torch.randn(b, 1), torch.tensor([[-1, -1, 3, 4, 5, 6]] * b), torch.tensor([0, 0, 1, 2, 2])
    )
    ent = model.entity(torch.arange(c))
    logits, aux = model.score(user, ent, torch.tensor([0, 0, 1, 2, 2]))
    assert logits.shape == (b, c)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["encoder.emb.aid.weight"] is not None
    backbone_grads = [g for n, g in grads.items() if not n.startswith("encoder.")]
    assert backbone_grads and all(g is not None and torch.isfinite(g).all() for g in backbone_grads)
    if arch is Architecture.BACKBONE:
        assert aux["shared"].shape == aux["specific"].shape == (b, c, TINY.expert_dims[-1])
        assert aux["gate"].shape == (b, 2)
    assert model.vectors(ent).shape[0] == c


def test_scores_do_not_depend_on_batch_composition() -> None:
    """The grouped (sorted) and gather paths, and one user alone, give the same logits."""
    torch.manual_seed(0)
    model = build_model(_schema(), _entities(), TINY, Architecture.BACKBONE).eval()
    dom = torch.tensor([0, 1, 1, 2])
    user = model.user(torch.randint(0, 5, (4, 1)), torch.randn(4, 1), torch.randint(-1, 40, (4, 6)), dom)
    ent = model.entity(torch.arange(11))
    batch, _ = model.score(user, ent, dom)
    alone, _ = model.score({k: v[2:3] for k, v in user.items()}, ent, dom[2:3])
    torch.testing.assert_close(batch[2:3], alone, rtol=1e-5, atol=1e-5)


def test_dselect_k_gate_is_a_sub_probability() -> None:
    torch.manual_seed(0)
    model = build_model(_schema(), _entities(), TINY, Architecture.DSELECT_K)
    x = _pair(b=3, c=4, dims=model.encoder.pair_dims)
    w = model.backbone.mix(x, Domains(torch.tensor([0, 1, 2]), 3))
    assert w.shape == (3, 4, TINY.num_experts)
    assert torch.all(w >= 0) and torch.all(w.sum(-1) <= 1 + 1e-5)


@pytest.mark.parametrize("arch", [a for a in Architecture if a is not Architecture.TWO_TOWER])
def test_per_user_candidates_score_like_each_user_alone(arch: Architecture) -> None:
    """Entity tensors (B, C, ...), each user its own candidates (batched serving), give each user's own scores."""
    torch.manual_seed(0)
    model = build_model(_schema(), _entities(), TINY, arch).eval()
    dom = torch.tensor([2, 0, 1])  # unsorted on purpose, as concurrent requests arrive
    user = model.user(torch.randint(0, 5, (3, 1)), torch.randn(3, 1), torch.randint(-1, 40, (3, 6)), dom)
    rows = torch.tensor([[1, 5, 9, 30], [0, 2, 2, 39], [7, 8, 3, 11]])
    with torch.no_grad():
        ent = {n: t.reshape(3, 4, *t.shape[1:]) for n, t in model.entity(rows.reshape(-1)).items()}
        batched, _ = model.score(user, ent, dom)
        assert batched.shape == (3, 4)
        for b in range(3):
            alone, _ = model.score({k: v[b : b + 1] for k, v in user.items()}, model.entity(rows[b]), dom[b : b + 1])
            torch.testing.assert_close(batched[b : b + 1], alone, rtol=1e-5, atol=1e-5)
