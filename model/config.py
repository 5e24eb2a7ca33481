"""Configuration of the matching model, its auxiliary losses and its training (paper V-A3 sizes).

One frozen dataclass per part. ``METHODS`` maps every operator-facing method name of
``unimatch train --method`` (the operator-facing names, kept stable for scripts) to an architecture plus an RRL configuration, so
the ablations of the paper's Table IV (Backbone, +DAL, +DAL&UWL, +MVWDL, +RRL) are configurations of
one model, never forks of it.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args


class ConfigError(ValueError):
    """A configuration value is invalid (names the field and the value)."""


class Architecture(enum.Enum):
    """The network that turns R = [E_uee, E_tran, E_att, E_aid] into one logit per (user, entity).

    All share the embeddings, ad network, user transformer and target attention (paper V-A3: the
    methods "differ only in the design of the backbone and RRL module"); ``TWO_TOWER`` is the
    inner-product baseline the search benchmark compares against.
    """

    BACKBONE = "backbone"
    DNN = "dnn"
    SHARED_BOTTOM = "shared-bottom"
    CROSS_STITCH = "cross-stitch"
    MMOE = "mmoe"
    DSELECT_K = "dselect-k"
    PLE = "ple"
    TWO_TOWER = "two-tower"


class NegativeSampler(enum.Enum):
    """Distribution Q the extra negatives are drawn from (its probabilities enter the log-Q correction)."""

    UNIFORM = "uniform"
    POPULARITY = "popularity"


class OrthoMode(enum.Enum):
    """Which orthogonality loss of paper Eq. 24 the RRL module adds (model/rrl/orthogonal.py says why both)."""

    PAPER = "paper"  # ||E_s^T E_d - I||_F^2, Eq. 24 as printed
    DIFFERENCE = "difference"  # ||E_s^T E_d||_F^2, the soft orthogonality of domain separation networks


# Where training and evaluation run: torch's device type; under torchrun "cuda" becomes each rank's GPU.
Device = Literal["cpu", "cuda"]
DEVICES: tuple[str, ...] = get_args(Device)
# The model-free yardsticks of `unimatch eval --baseline`.
Baseline = Literal["popularity"]
BASELINES: tuple[str, ...] = get_args(Baseline)
PRECISIONS = ("fp32", "bf16")
LR_SCALINGS = ("none", "linear", "sqrt")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the shared network parts (paper III-B, V-A3)."""

    # d of E_aid, E_uee, E_tran, E_att: 32 keeps a 2-core CPU step cheap and a 1M-entity id table at 128 MB.
    embed_dim: int = 32
    # width of each categorical feature embedding inside E_u / E_a (concatenated, then projected)
    cat_dim: int = 8
    domain_dim: int = 8  # E_did
    ad_hidden: tuple[int, ...] = (64,)  # ad network MLP hidden layers; output is embed_dim
    transformer_layers: int = 1
    transformer_heads: int = 2
    transformer_ff: int = 64
    dropout: float = 0.0
    # Paper V-A3: "4-layer MLPs ... [256, 128, 64, 1]": experts are the first two layers, towers the last two.
    expert_dims: tuple[int, ...] = (256, 128)
    tower_dims: tuple[int, ...] = (64, 1)
    num_experts: int = 4  # MMoE / DSelect-k / PLE shared experts
    dselect_k: int = 2  # experts selected per gate by DSelect-k
    two_tower_dim: int = 32  # output width of both towers of the two-tower model

    def validate(self) -> None:
        for name in ("embed_dim", "cat_dim", "domain_dim", "transformer_layers", "transformer_heads", "num_experts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.embed_dim % self.transformer_heads:
            raise ConfigError(
                f"model.embed_dim {self.embed_dim} is not divisible by transformer_heads {self.transformer_heads}"
            )
        if not self.expert_dims or not self.tower_dims or self.tower_dims[-1] != 1:
            raise ConfigError(f"model.tower_dims must end in 1, got {self.tower_dims}")
        if not 1 <= self.dselect_k <= self.num_experts:
            raise ConfigError(f"model.dselect_k {self.dselect_k} must be in 1..num_experts={self.num_experts}")


@dataclass(frozen=True)
class RRLConfig:
    """Robust representation learning (paper III-D), training only; every part switchable."""

    dal: bool = False  # Algorithm 2: shared classifier behind a GRL (+ spectral norm) and specific classifier
    mvwdl: bool = False  # Algorithm 3: K projections, K-1 WGAN-GP critics, Eq. 20 weighting
    ortho: bool = False  # Eq. 24
    uwl: bool = False  # Eq. 25; without it every auxiliary loss has the fixed weight below
    aux_weight: float = 0.01  # paper V-A3: "fixed at 0.01" without UWL
    dal_hidden: int = 64  # paper V-A3: "DAL module is a single-layer MLP with a dimension of 64"
    critic_dims: tuple[int, ...] = (128, 64, 1)  # paper V-A3: "MVWDL is a 3-layer MLP [128, 64, 1]"
    projection_dim: int = 64
    gp_weight: float = 10.0  # WGAN-GP's lambda (Gulrajani et al. 2017)
    grl_lambda: float = 1.0
    # Eq. 24 as printed, ||E_s^T E_d - I||_F^2 ("paper"), or the soft orthogonality ||E_s^T E_d||_F^2
    # of domain separation networks ("difference"), which is what the text says it wants.
    # A string ("paper", as config.json and experiment options spell it) is accepted and converted.
    ortho_mode: OrthoMode = OrthoMode.PAPER
    # UWL's log sigma^2 is clamped: the adversarial terms can be negative, and 1/(2 sigma^2) L + log sigma
    # has no minimum in sigma for L < 0, so an unclamped sigma would run to 0 and its weight to infinity.
    uwl_log_var_range: tuple[float, float] = (-4.0, 6.0)
    # NANN (Chen et al., CIKM 2022): FGSM on the entity vector the graph is built on, KL clean vs perturbed
    adversarial: bool = False
    adv_epsilon: float = 0.05
    adv_weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.ortho_mode, OrthoMode):
            try:
                mode = OrthoMode(self.ortho_mode)
            except ValueError:
                raise ConfigError(
                    f"rrl.ortho_mode must be 'paper' or 'difference', got {self.ortho_mode!r}"
                ) from None
            object.__setattr__(self, "ortho_mode", mode)  # frozen: the one normalisation at construction

    @property
    def any_aux(self) -> bool:
        return self.dal or self.mvwdl or self.ortho


@dataclass(frozen=True)
class LossConfig:
    """Sampled softmax with log-Q correction (paper Eqs. 2-4)."""

    in_batch: bool = True  # the batch's positives are negatives of the other users
    # Extra negatives shared by the batch. 64 keeps a step ~B x (B + 64) pairs; each doubling of the
    # candidate set roughly doubles the step time on CPU (measured in docs/model.md).
    num_sampled: int = 64
    sampler: NegativeSampler = NegativeSampler.POPULARITY
    popularity_power: float = 0.75  # word2vec-style flattening of the popularity sampler
    log_q: bool = True
    # mask candidates the user's domain cannot show (domain_mask), so the softmax is per domain
    mask_ineligible: bool = True
    # In-batch negatives shared by the batch. None (today's layout): all B positives are candidates of
    # every user, so a step scores B x (B + S) pairs and the per-example cost grows with the batch
    # (B = 4096 would be ~4,160 pairs per example instead of ~190). An int M: each user scores its own
    # positive (column 0) plus one shared set of min(M, B) of the batch's positives, drawn once per
    # step, and the S sampled negatives: B x (1 + M + S) pairs, so large GPU batches keep the paper's
    # loss at a constant cost per example. Log-Q becomes M p_pos(a) + S q(a) (a uniform subsample of
    # the positives keeps their distribution); with M >= B the two layouts give the same loss.
    shared_in_batch: int | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``train(cfg)`` needs; saved as ``config.json`` in the run directory."""

    data: Path
    out: Path
    method: str = "backbone-rrl"
    epochs: int = 1
    # exactly this many optimizer steps, the epochs repeating as needed (overrides epochs)
    max_steps: int | None = None
    # stop when validation Recall-all@valid_n has not improved for `patience` checks; best.pt kept
    early_stop: bool = False
    patience: int = 3
    eval_every: int | None = None  # steps between validation checks; None = once per epoch
    # validation users scored per check (sampled once, seeded); 0 = no validation figure at all
    valid_users: int = 256
    valid_n: int = 50  # the N of the validation Recall-all@N
    # cap on the (user, eligible entity) pairs one check scores: exhaustive scoring ran at ~34k pairs/s
    # on the shared CPUs (docs/model.md), so 256 users of the 50k-entity preset would take ~12 minutes per
    # check; fewer users are drawn instead (at least 10)
    valid_pair_budget: int = 1_000_000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    device: Device = "cpu"
    log_every: int = 1  # JSONL line every N steps
    checkpoint_every: int = 200  # steps; a checkpoint is also written at the end
    resume: bool = True  # continue from RUN/checkpoint.pt when it exists
    progress: bool = True
    threads: int | None = None  # torch intra-op threads; None = torch's default
    # ---- speed options (docs/gpu.md); the defaults keep the CPU behaviour measured in docs/model.md ----
    # "bf16": forward and loss under torch.autocast(bfloat16) (weights, Adam state and the softmax stay
    # float32; no loss scaling is needed with bf16's exponent range). Tensor cores on CUDA; on CPU it
    # is correct but was not faster on the shared cores (docs/gpu.md), hence "fp32" by default.
    precision: str = "fp32"
    # torch.compile the training objective (dynamic shapes: the per-domain group sizes change every
    # batch). Falls back to eager with a one-line warning where compilation fails (no C compiler,
    # unsupported platform). Off by default: compiling costs tens of seconds up front.
    compile: bool = False
    # batches prepared this many steps ahead in a background thread (history windows, negatives,
    # log-Q, masks; pinned host memory on CUDA), so the accelerator never waits for the host.
    # 0 = inline. Same seed -> the same batches in the same order either way.
    prefetch: int = 0
    # learning rate for a batch B: lr x (B / lr_reference_batch) ("linear", Goyal et al. 2017),
    # lr x sqrt(B / lr_reference_batch) ("sqrt", the rule for Adam of Malladi et al. 2022), or lr as
    # given ("none", today's behaviour). lr is then the rate tuned at the reference batch.
    lr_scaling: str = "none"
    lr_reference_batch: int = 128  # the batch size at which `lr` was tuned (every CPU run so far)
    # linear warm-up of the learning rate over this many steps (large scaled rates diverge without one)
    lr_warmup_steps: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    rrl: RRLConfig = field(default_factory=RRLConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; expected one of {sorted(METHODS)}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.patience < 1:
            raise ConfigError(f"patience must be >= 1, got {self.patience}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ConfigError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.valid_users < 0:
            raise ConfigError(f"valid_users must be >= 0, got {self.valid_users}")
        if self.early_stop and self.valid_users == 0:
            raise ConfigError("early_stop needs validation users (valid_users > 0)")
        if self.valid_pair_budget < 1:
            raise ConfigError(f"valid_pair_budget must be >= 1, got {self.valid_pair_budget}")
        if self.valid_n < 1:
            raise ConfigError(f"valid_n must be >= 1, got {self.valid_n}")
        if self.batch_size < 2:
            raise ConfigError(f"batch_size must be >= 2, got {self.batch_size}")
        if self.loss.num_sampled < 0:
            raise ConfigError(f"loss.num_sampled must be >= 0, got {self.loss.num_sampled}")
        if not self.loss.in_batch and self.loss.num_sampled == 0:
            raise ConfigError("with in_batch off, loss.num_sampled must be > 0 (no negatives otherwise)")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.loss.shared_in_batch is not None and self.loss.shared_in_batch < 1:
            raise ConfigError(f"loss.shared_in_batch must be >= 1 or None, got {self.loss.shared_in_batch}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.prefetch < 0:
            raise ConfigError(f"prefetch must be >= 0, got {self.prefetch}")
        if self.lr_scaling not in LR_SCALINGS:
            raise ConfigError(f"lr_scaling must be one of {LR_SCALINGS}, got {self.lr_scaling!r}")
        if self.lr_reference_batch < 1:
            raise ConfigError(f"lr_reference_batch must be >= 1, got {self.lr_reference_batch}")
        if self.lr_warmup_steps < 0:
            raise ConfigError(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        arch = METHODS[self.method].architecture
        if (self.rrl.any_aux or self.rrl.uwl) and arch is not Architecture.BACKBONE:
            raise ConfigError(f"RRL needs the backbone's shared/specific experts; method {self.method!r} has none")
        self.model.validate()

    def scaled_lr(self) -> float:
        """The learning rate at ``batch_size`` under ``lr_scaling`` (before warm-up)."""
        ratio = self.batch_size / self.lr_reference_batch
        if self.lr_scaling == "linear":
            return self.lr * ratio
        if self.lr_scaling == "sqrt":
            return self.lr * math.sqrt(ratio)
        return self.lr

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based): scaled, then warmed up linearly."""
        lr = self.scaled_lr()
        if self.lr_warmup_steps and step < self.lr_warmup_steps:
            return lr * (step + 1) / self.lr_warmup_steps
        return lr

    def to_json(self) -> dict[str, Any]:
        def conv(v: Any) -> Any:
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, enum.Enum):
                return v.value
            if isinstance(v, tuple):
                return [conv(x) for x in v]
            if isinstance(v, dict):
                return {k: conv(x) for k, x in v.items()}
            return v

        return conv(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TrainConfig:
        def tup(d: dict[str, Any]) -> dict[str, Any]:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

        obj = dict(obj)
        loss = tup(obj.pop("loss", {}))
        if "sampler" in loss:
            loss["sampler"] = NegativeSampler(loss["sampler"])
        try:
            return cls(
                data=Path(obj.pop("data")),
                out=Path(obj.pop("out")),
                model=ModelConfig(**tup(obj.pop("model", {}))),
                rrl=RRLConfig(**tup(obj.pop("rrl", {}))),
                loss=LossConfig(**loss),
                **obj,
            )
        except TypeError as exc:
            raise ConfigError(f"config.json: {exc}") from None


@dataclass(frozen=True)
class MethodSpec:
    architecture: Architecture
    rrl: RRLConfig


_RRL_ALL = RRLConfig(dal=True, mvwdl=True, ortho=True, uwl=True)

# Operator-facing names (CONTRACT.md) plus the Table IV ablations and the NANN adversarial option.
METHODS: dict[str, MethodSpec] = {
    "backbone-rrl": MethodSpec(Architecture.BACKBONE, _RRL_ALL),
    "backbone": MethodSpec(Architecture.BACKBONE, RRLConfig()),
    "backbone-dal": MethodSpec(Architecture.BACKBONE, RRLConfig(dal=True)),
    "backbone-dal-uwl": MethodSpec(Architecture.BACKBONE, RRLConfig(dal=True, uwl=True)),
    "backbone-mvwdl": MethodSpec(Architecture.BACKBONE, RRLConfig(mvwdl=True)),
    "backbone-ortho": MethodSpec(Architecture.BACKBONE, RRLConfig(ortho=True)),
    "backbone-rrl-adv": MethodSpec(Architecture.BACKBONE, dataclasses.replace(_RRL_ALL, adversarial=True)),
    "backbone-adv": MethodSpec(Architecture.BACKBONE, RRLConfig(adversarial=True)),
    "dnn": MethodSpec(Architecture.DNN, RRLConfig()),
    "shared-bottom": MethodSpec(Architecture.SHARED_BOTTOM, RRLConfig()),
    "cross-stitch": MethodSpec(Architecture.CROSS_STITCH, RRLConfig()),
    "mmoe": MethodSpec(Architecture.MMOE, RRLConfig()),
    "dselect-k": MethodSpec(Architecture.DSELECT_K, RRLConfig()),
    "ple": MethodSpec(Architecture.PLE, RRLConfig()),
    "two-tower": MethodSpec(Architecture.TWO_TOWER, RRLConfig()),
}


def method_config(method: str, **overrides: Any) -> TrainConfig:
    """A TrainConfig for ``method`` with its RRL switches; ``overrides`` are TrainConfig fields."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
    rrl = overrides.pop("rrl", METHODS[method].rrl)
    cfg = TrainConfig(method=method, rrl=rrl, **overrides)
    cfg.validate()
    return cfg
