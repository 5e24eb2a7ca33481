"""Small building blocks shared by every architecture (paper III-B, III-C).

The pair convention used throughout the model: a batch scores B users against C candidate entities,
and every network input R = [E_uee, E_tran, E_att, E_aid] is split by what it depends on:

* ``PairInputs.user``   (B, Du)    depends on the user only (E_tran, E_did),
* ``PairInputs.entity`` (C, De)    depends on the entity only (E_uee, E_aid),
* ``PairInputs.pair``   (B, C, Dp) depends on both (E_att, target attention).

A linear layer over R is the sum of three linear maps over these parts (``SplitLinear``), so the
user and entity parts are computed B and C times instead of B*C times. That is exact, and it is what
makes training with in-batch negatives affordable on a CPU and the pair scorer cheap per candidate.
Training (B users) and serving (B = 1, C = candidates of one request) run the same code.

Domain-specific weights are stored stacked, (K, in, out), and selected per user with a gather, so the
exported ONNX pair scorer selects the domain's expert and tower by a Gather on the ``domain`` input
and one graph serves every domain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# Large negative instead of -inf: a fully padded row then gives a finite softmax (the mask zeroes it
# afterwards) and exports to ONNX without NaN handling.
MASK_VALUE = -1e9


@dataclass
class PairInputs:
    """R split by dependency; see the module docstring."""

    user: Tensor  # (B, Du)
    entity: Tensor  # (C, De) shared by all users, or (B, C, De): each user its own candidates (batched serving)
    pair: Tensor  # (B, C, Dp)

    @property
    def dims(self) -> tuple[int, int, int]:
        return self.user.shape[-1], self.entity.shape[-1], self.pair.shape[-1]


def mlp(in_dim: int, dims: tuple[int, ...], *, act_layer: type[nn.Module] = nn.ReLU, last_act: bool = False) -> nn.Sequential:
    """Linear layers ``in_dim -> dims[0] -> ... -> dims[-1]`` with activations between them."""
    layers: list[nn.Module] = []
    prev = in_dim
    for i, d in enumerate(dims):
        layers.append(nn.Linear(prev, d))
        if i < len(dims) - 1 or last_act:
            layers.append(act_layer())
        prev = d
    return nn.Sequential(*layers)


class SplitLinear(nn.Module):
    """``Linear(concat(user, entity, pair))`` evaluated part by part -> (B, C, out). Exact."""

    def __init__(self, dims: tuple[int, int, int], out_dim: int) -> None:
        super().__init__()
        self.dims = dims
        self.linear = nn.Linear(sum(dims), out_dim)

    def forward(self, x: PairInputs) -> Tensor:
        du, de, _ = self.dims
        w = self.linear.weight  # (out, Du + De + Dp)
        u = x.user @ w[:, :du].t()
        u = u + _bias(self.linear.bias, u)  # (B, out)
        e = x.entity @ w[:, du : du + de].t()  # (C, out), or (B, C, out) for per-user candidates
        p = x.pair @ w[:, du + de :].t()  # (B, C, out)
        return p + u.unsqueeze(1) + (e if e.dim() == 3 else e.unsqueeze(0))


def _bias(bias: Tensor, like: Tensor) -> Tensor:
    """``bias`` in the dtype of the matmul output it is added to, under autocast only.

    A float32 bias added to a bf16 product promotes the sum to float32, so every activation between
    layers would be float32 again (twice the memory traffic) although nn.Linear keeps bf16. Outside
    autocast (training in float32, ONNX export) this is the bias itself: the graphs do not change.
    """
    return bias.to(like.dtype) if torch.is_autocast_enabled(like.device.type) else bias


def _init_stacked(weight: Tensor, bias: Tensor) -> None:
    # The same initialisation nn.Linear uses, per stacked slice.
    fan_in = weight.shape[1]
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)
    nn.init.uniform_(bias, -bound, bound)


class Domains:
    """Each user's domain, (B,), plus the group sizes when the batch is sorted by domain.

    Sorted batches (the trainer sorts every batch; the evaluator scores one domain at a time) take
    the grouped path: one plain matmul per domain on a contiguous slice, no per-user weight gather,
    whose backward (an index_put into the stacked weights) dominated a CPU step. Unsorted batches and
    the ONNX export (B = 1) take the gather path.
    """

    def __init__(self, index: Tensor, num_domains: int) -> None:
        self.index = index.long()
        self.counts: list[int] | None = None
        tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        if not tracing and index.shape[0] > 1 and bool((self.index[1:] >= self.index[:-1]).all()):
            self.counts = torch.bincount(self.index, minlength=num_domains).tolist()

    def split(self, x: Tensor) -> list[tuple[int, Tensor]]:
        """(domain, rows of x of that domain) for the domains present; ``torch.split`` so that the
        backward is one concatenation rather than a zero-filled full tensor per slice."""
        if self.counts is None:
            raise RuntimeError("Domains.split() needs a batch sorted by domain")
        return [(k, part) for k, part in enumerate(x.split(self.counts)) if part.shape[0]]


class StackedSplitLinear(nn.Module):
    """K domain-specific ``SplitLinear`` layers; user b uses the slice of its domain -> (B, C, out)."""

    def __init__(self, num_domains: int, dims: tuple[int, int, int], out_dim: int) -> None:
        super().__init__()
        self.dims = dims
        self.weight = nn.Parameter(torch.empty(num_domains, sum(dims), out_dim))
        self.bias = nn.Parameter(torch.empty(num_domains, out_dim))
        _init_stacked(self.weight, self.bias)

    def forward(self, x: PairInputs, domain: Domains) -> Tensor:
        du, de, _ = self.dims
        if domain.counts is not None:
            outs = []
            # per-user candidates (B, C, De) are split with the users; shared ones (C, De) are not
            ents = domain.split(x.entity) if x.entity.dim() == 3 else None
            for i, ((k, user), (_, pair)) in enumerate(zip(domain.split(x.user), domain.split(x.pair), strict=True)):
                w = self.weight[k]
                u = user @ w[:du]
                u = u + _bias(self.bias[k], u)  # (n, out)
                if ents is None:
                    e = (x.entity @ w[du : du + de]).unsqueeze(0)  # (1, C, out)
                else:
                    e = ents[i][1] @ w[du : du + de]  # (n, C, out)
                outs.append(torch.matmul(pair, w[du + de :]) + u.unsqueeze(1) + e)
            return torch.cat(outs)
        idx = domain.index
        w = self.weight[idx]  # (B, in, out): Gather on the stacked weights
        u = torch.matmul(x.user.unsqueeze(1), w[:, :du])
        u = u + _bias(self.bias[idx].unsqueeze(1), u)  # (B, 1, out)
        p = torch.matmul(x.pair, w[:, du + de :])  # (B, C, out)
        if x.entity.dim() == 3:  # per-user candidates (B, C, De): each user's own domain slice
            return p + u + torch.matmul(x.entity, w[:, du : du + de])
        # entity part once per domain, not per user: (K, C, out), then each user takes its domain's
        e_all = torch.matmul(x.entity.unsqueeze(0), self.weight[:, du : du + de])  # (K, C, out)
        return p + u + e_all[idx]


class StackedLinear(nn.Module):
    """K domain-specific linear layers over (B, C, in); user b uses its domain's slice."""

    def __init__(self, num_domains: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_domains, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(num_domains, out_dim))
        _init_stacked(self.weight, self.bias)

    def forward(self, x: Tensor, domain: Domains) -> Tensor:
        if domain.counts is not None:
            outs = []
            for k, part in domain.split(x):
                y = torch.matmul(part, self.weight[k])
                outs.append(y + _bias(self.bias[k], y))
            return torch.cat(outs)
        idx = domain.index
        y = torch.matmul(x, self.weight[idx])
        return y + _bias(self.bias[idx].unsqueeze(1), y)  # (B, C, out)


class StackedMLP(nn.Module):
    """K domain-specific MLPs over (B, C, in) selected by domain (towers, domain experts' upper layers)."""

    def __init__(self, num_domains: int, in_dim: int, dims: tuple[int, ...], *, last_act: bool = False) -> None:
        super().__init__()
        layers, prev = [], in_dim
        for d in dims:
            layers.append(StackedLinear(num_domains, prev, d))
            prev = d
        self.layers = nn.ModuleList(layers)
        self.last_act = last_act

    def forward(self, x: Tensor, domain: Domains) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, domain)
            if i < len(self.layers) - 1 or self.last_act:
                x = torch.relu(x)
        return x


class PairMLP(nn.Module):
    """An MLP over R given as ``PairInputs``: ``SplitLinear`` first, ordinary layers after -> (B, C, out)."""

    def __init__(self, dims_in: tuple[int, int, int], dims: tuple[int, ...], *, last_act: bool = True) -> None:
        super().__init__()
        self.first = SplitLinear(dims_in, dims[0])
        self.rest = mlp(dims[0], dims[1:], last_act=last_act) if len(dims) > 1 else None
        self.first_act = len(dims) > 1 or last_act

    def forward(self, x: PairInputs) -> Tensor:
        h = self.first(x)
        if self.first_act:
            h = torch.relu(h)
        return self.rest(h) if self.rest is not None else h


class StackedPairMLP(nn.Module):
    """K domain-specific ``PairMLP``s, the one of each user's domain applied -> (B, C, out)."""

    def __init__(self, num_domains: int, dims_in: tuple[int, int, int], dims: tuple[int, ...], *, last_act: bool = True) -> None:
        super().__init__()
        self.first = StackedSplitLinear(num_domains, dims_in, dims[0])
        self.rest = StackedMLP(num_domains, dims[0], dims[1:], last_act=last_act) if len(dims) > 1 else None
        self.first_act = len(dims) > 1 or last_act

    def forward(self, x: PairInputs, domain: Domains) -> Tensor:
        h = self.first(x, domain)
        if self.first_act:
            h = torch.relu(h)
        return self.rest(h, domain) if self.rest is not None else h


class GradientReversalFunction(torch.autograd.Function):
    """Identity forward, gradient times ``-lambda`` backward (Ganin & Lempitsky 2015; paper Eq. 13)."""

    @staticmethod
    def forward(ctx, x: Tensor, lambda_: float) -> Tensor:
        ctx.lambda_ = lambda_
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad.neg() * ctx.lambda_, None


class GradientReversal(nn.Module):
    def __init__(self, lambda_: float = 1.0) -> None:
        super().__init__()
        self.lambda_ = lambda_

    def forward(self, x: Tensor) -> Tensor:
        return GradientReversalFunction.apply(x, self.lambda_)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm multi-head self-attention + feed-forward block with a key padding mask.

    Written out (rather than ``nn.TransformerEncoderLayer``) so that its padding semantics are explicit
    and it exports to ONNX identically in training and eval mode (no fused fast path).
    """

    def __init__(self, dim: int, heads: int, ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.GELU(), nn.Linear(ff, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, T, d); mask (B, T) float, 1 = real token. Returns (B, T, d)."""
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q = q.reshape(b, t, h, d // h).transpose(1, 2)  # (B, H, T, dh)
        k = k.reshape(b, t, h, d // h).transpose(1, 2)
        v = v.reshape(b, t, h, d // h).transpose(1, 2)
        att = q @ k.transpose(-1, -2) / math.sqrt(d // h)  # (B, H, T, T)
        att = att + (1.0 - mask)[:, None, None, :] * MASK_VALUE
        att = self.drop(torch.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, t, d)  # (B, T, d)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.ff(self.norm2(x)))


class TargetAttention(nn.Module):
    """Attention of each candidate (query from E_aid) over the user's behaviour sequence -> E_att (III-B).

    The key projection depends only on the user, so ``keys`` runs in the user encoder once per
    request; ``forward`` is what the pair scorer pays per candidate: two (C, L) products.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.scale = 1.0 / math.sqrt(dim)

    def keys(self, seq_emb: Tensor) -> Tensor:
        return self.k(seq_emb)  # (B, L, d)

    def forward(self, e_aid: Tensor, seq_keys: Tensor, seq_vals: Tensor, seq_mask: Tensor) -> Tensor:
        """e_aid (C, d) or per-user (B, C, d); seq_keys/seq_vals (B, L, d); seq_mask (B, L) -> E_att (B, C, d)."""
        q = self.q(e_aid) * self.scale  # (C, d) or (B, C, d)
        scores = torch.matmul(q if q.dim() == 3 else q.unsqueeze(0), seq_keys.transpose(1, 2))  # (B, C, L)
        scores = scores + (1.0 - seq_mask).unsqueeze(1) * MASK_VALUE
        # multiplying by the mask makes an empty history give E_att = 0 instead of a uniform average of padding
        w = torch.softmax(scores, dim=-1) * seq_mask.unsqueeze(1)  # (B, C, L)
        return torch.matmul(w, seq_vals)  # (B, C, d)
