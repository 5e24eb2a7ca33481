"""Synthetic multi-domain, multi-entity interaction logs with planted structure (for scale and tests).

The generating process, chosen so that every part of the paper's model has something to learn:

* **Entities** belong to entity types with the skew of the paper's Table II (one type dominates:
  5.56M / 85.8k / 8.1k / 74.4k), and to type-homogeneous *clusters* (categories) with latent
  centroids; an entity's latent vector is its centroid plus noise, its popularity log-normal.
* **Users** have a shared latent preference ``z_u``. In domain ``k`` the preference is
  ``z_u + alpha * z_u @ R_k`` (``R_k`` a random rotation): a part shared across domains and a
  domain-specific part, so a multi-domain model *can* beat a single shared model. Each domain also
  has its own affinity for entity types (a per-domain bias on clusters).
* **Behaviour**: each interaction picks a cluster from softmax(pref · centroid / tau + bias), then an
  entity inside the cluster by popularity. With probability ``repeat`` it stays in the cluster of the
  user's previous interaction, so the behaviour sequence predicts the next one (what the user
  transformer and target attention exploit). Domain sizes are skewed like Table II's records.

Everything is vectorised and chunked by users, so 1M entities / 200k users / 10M interactions fit
in a few minutes and a few GB on 2 cores. Deterministic for a given seed and preset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from contracts.dataset import Entities, Interactions, Users, write_dataset
from contracts.schema import CategoricalFeature, FeatureSchema, NumericFeature
from model.data import SynthPreset
from model.data.split import leave_last_out


@dataclass(frozen=True)
class SynthConfig:
    """Sizes and knobs of the generator; the presets below fill the sizes."""

    num_users: int
    num_entities: int
    num_interactions: int
    num_domains: int = 4
    entity_types: tuple[str, ...] = ("item", "shop", "video", "live")
    # Table II entity counts 5.56M / 85.8k / 8.1k / 74.4k, as shares of the catalogue.
    entity_type_shares: tuple[float, ...] = (0.9725, 0.0150, 0.0014, 0.0130)
    # Smallest share any type gets, so tiny catalogues still contain every type.
    min_type_share: float = 0.01
    # Table II records per domain (0.50, 0.47, 0.61, 1.09 billion), as shares; cycled for K != 4.
    domain_shares: tuple[float, ...] = (0.187, 0.175, 0.228, 0.410)
    latent_dim: int = 16
    # One cluster per ~1000 entities, clipped: enough categories to be non-trivial, cheap softmax.
    entities_per_cluster: int = 1000
    min_clusters: int = 16
    max_clusters: int = 1000
    # Strength of the domain-specific part of user preferences (0 = domains identical).
    domain_specific_strength: float = 0.8
    temperature: float = 0.35
    # Probability that an interaction stays in the previous interaction's cluster.
    repeat: float = 0.5
    max_seq_len: int = 50
    seed: int = 0
    user_chunk: int = 2000
    domains: tuple[str, ...] = field(default=())

    def domain_names(self) -> list[str]:
        if self.domains:
            return list(self.domains)
        return [f"domain_{k}" for k in range(self.num_domains)]


PRESETS: dict[SynthPreset, SynthConfig] = {
    # seconds; for unit tests
    "tiny": SynthConfig(num_users=300, num_entities=2_000, num_interactions=15_000),
    # about a minute end to end; for the demo
    "small": SynthConfig(num_users=5_000, num_entities=50_000, num_interactions=300_000),
    # the search benchmark's 100k catalogue
    "100k": SynthConfig(num_users=50_000, num_entities=100_000, num_interactions=2_000_000),
    # the scale target: 1M entities, 200k users, 10M interactions
    "1m": SynthConfig(num_users=200_000, num_entities=1_000_000, num_interactions=10_000_000),
}


def preset(name: str, *, seed: int = 0) -> SynthConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return replace(PRESETS[name], seed=seed)


def synth_schema(cfg: SynthConfig, num_clusters: int) -> FeatureSchema:
    types = list(cfg.entity_types)
    return FeatureSchema(
        domains=cfg.domain_names(),
        entity_types=types,
        user_categorical=[
            CategoricalFeature(name="age_bucket", cardinality=7),
            CategoricalFeature(name="gender", cardinality=3),
            CategoricalFeature(name="city_tier", cardinality=6),
        ],
        user_numeric=[NumericFeature(name="activity"), NumericFeature(name="tenure")],
        entity_categorical=[
            CategoricalFeature(name="category", cardinality=num_clusters + 1),
            CategoricalFeature(name="brand", cardinality=4 * num_clusters + 1),
            CategoricalFeature(name="price_level", cardinality=11),
            # type-specific: only live streams have an anchor level; others get the default 0
            CategoricalFeature(name="anchor_level", cardinality=6, applies_to=[types[-1]]),
        ],
        entity_numeric=[
            NumericFeature(name="log_popularity"),
            NumericFeature(name="price"),
            NumericFeature(name="shop_rating", applies_to=[types[1]] if len(types) > 1 else None),
            NumericFeature(name="duration", applies_to=[types[2]] if len(types) > 2 else None),
        ],
        max_seq_len=cfg.max_seq_len,
    )


def _type_counts(cfg: SynthConfig) -> np.ndarray:
    shares = np.asarray(cfg.entity_type_shares[: len(cfg.entity_types)], dtype=np.float64)
    if shares.shape[0] != len(cfg.entity_types):
        raise ValueError("entity_type_shares must have one share per entity type")
    shares = np.maximum(shares / shares.sum(), cfg.min_type_share)
    counts = np.maximum(np.round(shares / shares.sum() * cfg.num_entities).astype(np.int64), 1)
    counts[0] += cfg.num_entities - counts.sum()  # the dominant type absorbs rounding
    if counts.min() < 1:
        raise ValueError(f"{cfg.num_entities} entities are too few for {len(cfg.entity_types)} types")
    return counts


@dataclass(frozen=True)
class _Catalogue:
    """The entity side of the generating process: types, clusters, latents and popularity."""

    entity_type: np.ndarray  # (E,) int16
    entity_cluster: np.ndarray  # (E,) int64, clusters are type-homogeneous
    cluster_type: np.ndarray  # (C,) entity type of each cluster
    centroids: np.ndarray  # (C, d) float32
    latent: np.ndarray  # (E, d) float32: centroid + noise
    log_pop: np.ndarray  # (E,) float64, log-normal popularity's log
    # Sampling an entity within a cluster by popularity: entities grouped by cluster, one global cumsum.
    by_cluster: np.ndarray  # (E,) entity rows sorted by cluster
    cum: np.ndarray  # (E,) cumulative popularity in by_cluster order
    cl_begin: np.ndarray  # (C,) first position of each cluster in by_cluster
    cl_end: np.ndarray  # (C,) one past its last position
    cum_lo: np.ndarray  # (C,) cum just before the cluster
    cum_hi: np.ndarray  # (C,) cum at the cluster's last entity

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])


@dataclass(frozen=True)
class _DomainTaste:
    """Per domain: its share of the interactions, its preference rotation R_k and its cluster bias."""

    shares: np.ndarray  # (K,) float64, sums to 1
    rotations: np.ndarray  # (K, d, d) float32
    cluster_bias: np.ndarray  # (K, C) float32


@dataclass(frozen=True)
class _Population:
    """The users: shared latent preference z_u and the number of interactions of each."""

    z: np.ndarray  # (U, d) float32
    per_user: np.ndarray  # (U,) int64, sums to cfg.num_interactions


def _catalogue(cfg: SynthConfig, rng: np.random.Generator) -> _Catalogue:
    """Entity types with Table II's skew, type-homogeneous clusters, latents and popularity."""
    d, n_ent, n_types = cfg.latent_dim, cfg.num_entities, len(cfg.entity_types)
    type_counts = _type_counts(cfg)
    n_clusters = int(np.clip(n_ent // cfg.entities_per_cluster, cfg.min_clusters, cfg.max_clusters))
    n_clusters = max(n_clusters, n_types)
    # clusters per type proportional to the type's size, at least one each
    cl_per_type = np.maximum(np.round(type_counts / n_ent * n_clusters).astype(np.int64), 1)
    cl_per_type[0] += n_clusters - cl_per_type.sum()
    cluster_type = np.repeat(np.arange(n_types), cl_per_type)  # (C,)
    entity_type = np.repeat(np.arange(n_types), type_counts).astype(np.int16)  # (E,)
    entity_cluster = np.empty(n_ent, dtype=np.int64)
    start = 0
    cl_start = 0
    for t in range(n_types):  # loop over a handful of types, not entities
        n_t, c_t = int(type_counts[t]), int(cl_per_type[t])
        sizes = rng.dirichlet(np.full(c_t, 2.0))  # uneven category sizes
        entity_cluster[start : start + n_t] = cl_start + rng.choice(c_t, size=n_t, p=sizes)
        start += n_t
        cl_start += c_t
    centroids = rng.standard_normal((n_clusters, d)).astype(np.float32) / np.sqrt(d)
    latent = centroids[entity_cluster] + 0.3 * rng.standard_normal((n_ent, d)).astype(np.float32) / np.sqrt(d)
    log_pop = rng.normal(0.0, 1.0, n_ent)
    pop = np.exp(log_pop)

    by_cluster = np.argsort(entity_cluster, kind="stable")
    cum = np.cumsum(pop[by_cluster])
    cl_sizes = np.bincount(entity_cluster, minlength=n_clusters)
    cl_end = np.cumsum(cl_sizes)
    cl_begin = cl_end - cl_sizes
    cum_lo = np.where(cl_begin > 0, cum[np.maximum(cl_begin - 1, 0)], 0.0)
    cum_hi = cum[cl_end - 1]
    return _Catalogue(
        entity_type=entity_type,
        entity_cluster=entity_cluster,
        cluster_type=cluster_type,
        centroids=centroids,
        latent=latent,
        log_pop=log_pop,
        by_cluster=by_cluster,
        cum=cum,
        cl_begin=cl_begin,
        cl_end=cl_end,
        cum_lo=cum_lo,
        cum_hi=cum_hi,
    )


def _domain_taste(cfg: SynthConfig, rng: np.random.Generator, cat: _Catalogue) -> _DomainTaste:
    """Table II's domain sizes, a random rotation per domain, and each domain's taste for clusters."""
    d, K, n_types = cfg.latent_dim, cfg.num_domains, len(cfg.entity_types)
    n_clusters = cat.num_clusters
    shares = np.resize(np.asarray(cfg.domain_shares, dtype=np.float64), K)
    shares /= shares.sum()
    rotations = np.stack([np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(K)]).astype(np.float32)
    type_affinity = rng.normal(0.0, 0.7, (K, n_types)).astype(np.float32)  # per-domain taste for types
    cluster_bias = type_affinity[:, cat.cluster_type] + 0.3 * rng.standard_normal((K, n_clusters)).astype(np.float32)
    # popular clusters are popular everywhere: log of the cluster's total popularity
    cluster_bias += 0.5 * np.log(np.maximum(cat.cum_hi - cat.cum_lo, 1e-9)).astype(np.float32)[None, :] / max(
        1.0, float(np.log(max(cfg.num_entities / n_clusters, 2.0)))
    )
    return _DomainTaste(shares=shares, rotations=rotations, cluster_bias=cluster_bias)


def _population(cfg: SynthConfig, rng: np.random.Generator) -> _Population:
    """User latents and log-normal activity, turned into exactly ``cfg.num_interactions`` interactions."""
    d, n_users = cfg.latent_dim, cfg.num_users
    z = rng.standard_normal((n_users, d)).astype(np.float32) / np.sqrt(d) * 3.0
    activity = rng.lognormal(0.0, 0.8, n_users)
    per_user = np.maximum(1, np.floor(activity / activity.sum() * cfg.num_interactions)).astype(np.int64)
    deficit = cfg.num_interactions - int(per_user.sum())
    if deficit > 0:
        np.add.at(per_user, rng.choice(n_users, size=deficit, replace=True, p=activity / activity.sum()), 1)
    elif deficit < 0:  # only from the floor of 1; trim from the most active users
        for u in np.argsort(-per_user)[: -deficit]:
            per_user[u] -= 1
    return _Population(z=z, per_user=per_user)


def _preferred_clusters(
    cfg: SynthConfig,
    rng: np.random.Generator,
    cat: _Catalogue,
    taste: _DomainTaste,
    people: _Population,
    inter_user: np.ndarray,
    inter_domain: np.ndarray,
    user_first: np.ndarray,
    progress: Callable[[int, int], None] | None,
) -> np.ndarray:
    """(N,) cluster of each interaction from softmax(pref . centroid / tau + bias), chunked by users."""
    K, n_users, n_clusters = cfg.num_domains, cfg.num_users, cat.num_clusters
    n_int = inter_user.shape[0]
    inter_cluster = np.empty(n_int, dtype=np.int64)
    for lo in range(0, n_users, cfg.user_chunk):
        hi = min(lo + cfg.user_chunk, n_users)
        zc = people.z[lo:hi]  # (b, d)
        pref = zc[:, None, :] + cfg.domain_specific_strength * np.einsum("bd,kde->bke", zc, taste.rotations)  # (b, K, d)
        logits = pref @ cat.centroids.T / cfg.temperature + taste.cluster_bias[None, :, :]  # (b, K, C)
        logits -= logits.max(axis=2, keepdims=True)
        probs = np.exp(logits)
        cdf = np.cumsum(probs, axis=2)
        cdf /= cdf[:, :, -1:]
        r0, r1 = user_first[lo], user_first[hi] if hi < n_users else n_int
        rows = (inter_user[r0:r1] - lo).astype(np.int64) * K + inter_domain[r0:r1]  # (n,) row of (b*K)
        flat = (cdf.reshape(-1, n_clusters) + np.arange((hi - lo) * K)[:, None]).ravel()
        target = rows + rng.random(r1 - r0) * (1 - 1e-9)
        pos = np.searchsorted(flat, target, side="right")
        inter_cluster[r0:r1] = np.minimum(pos - rows * n_clusters, n_clusters - 1)
        if progress is not None:
            progress(hi, n_users)
    return inter_cluster


def _interactions(
    cfg: SynthConfig,
    rng: np.random.Generator,
    cat: _Catalogue,
    taste: _DomainTaste,
    people: _Population,
    progress: Callable[[int, int], None] | None,
) -> Interactions:
    """The behaviour log: domain, cluster (with sessions), entity by popularity, time and split."""
    K, n_users, per_user = cfg.num_domains, cfg.num_users, people.per_user
    n_int = int(per_user.sum())
    inter_user = np.repeat(np.arange(n_users, dtype=np.int32), per_user)
    inter_domain = rng.choice(K, size=n_int, p=taste.shares).astype(np.int16)
    user_first = np.r_[0, np.cumsum(per_user)[:-1]]
    inter_cluster = _preferred_clusters(cfg, rng, cat, taste, people, inter_user, inter_domain, user_first, progress)

    # sessions: with prob `repeat` stay in the previous interaction's cluster (forward fill)
    fresh = rng.random(n_int) >= cfg.repeat
    fresh[user_first] = True
    last_fresh = np.maximum.accumulate(np.where(fresh, np.arange(n_int), 0))
    inter_cluster = inter_cluster[last_fresh]

    # entity inside the cluster by popularity (inverse CDF on the cluster's slice of the cumsum)
    u01 = rng.random(n_int)
    target = cat.cum_lo[inter_cluster] + u01 * (cat.cum_hi[inter_cluster] - cat.cum_lo[inter_cluster])
    pos = np.searchsorted(cat.cum, target, side="left")
    pos = np.clip(pos, cat.cl_begin[inter_cluster], cat.cl_end[inter_cluster] - 1)
    inter_entity = cat.by_cluster[pos].astype(np.int32)

    # timestamps: per user increasing, exponential gaps from a random start (seconds)
    gaps = rng.exponential(3600.0, n_int)
    ts = np.cumsum(gaps)
    ts -= np.repeat(ts[user_first] - rng.uniform(0, 86400 * 30, n_users), per_user)
    timestamp = (1_700_000_000 + ts).astype(np.int64)
    split = leave_last_out(inter_user, inter_domain, timestamp, num_domains=K)
    return Interactions(user=inter_user, entity=inter_entity, domain=inter_domain, timestamp=timestamp, split=split)


def _users(cfg: SynthConfig, rng: np.random.Generator, people: _Population) -> Users:
    """User ids and profile features (age, gender from z_u; city; activity; tenure), 10% of codes missing."""
    z, per_user, n_users = people.z, people.per_user, cfg.num_users
    age = 1 + np.digitize(z[:, 0] + 0.3 * rng.standard_normal(n_users), np.quantile(z[:, 0], [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6]))
    gender = 1 + (z[:, 1] + 0.5 * rng.standard_normal(n_users) > 0)
    city = 1 + rng.integers(0, 5, n_users)
    user_cat = np.stack([age, gender, city], axis=1).astype(np.int32)
    user_cat[rng.random(user_cat.shape) < 0.1] = 0  # 10% missing profile fields
    act = np.log(per_user.astype(np.float64))
    user_num = np.stack(
        [(act - act.mean()) / (act.std() + 1e-9), rng.standard_normal(n_users)], axis=1
    ).astype(np.float32)
    user_ids = np.char.add("u", np.char.zfill(np.arange(n_users).astype(str), len(str(n_users))))
    return Users(external_id=user_ids, cat=user_cat, num=user_num)


def _entities(cfg: SynthConfig, rng: np.random.Generator, cat: _Catalogue) -> Entities:
    """Entity ids ("item-0042") and features; the type-specific ones are 0 on the other types."""
    n_ent, n_types, K = cfg.num_entities, len(cfg.entity_types), cfg.num_domains
    entity_type, entity_cluster, log_pop = cat.entity_type, cat.entity_cluster, cat.log_pop
    price_raw = cat.latent[:, 2] * 2.0 + 0.5 * rng.standard_normal(n_ent)
    price_level = 1 + np.digitize(price_raw, np.quantile(price_raw, np.linspace(0.1, 0.9, 9)))
    brand = 1 + entity_cluster * 4 + rng.integers(0, 4, n_ent)
    last_type = n_types - 1
    anchor = np.where(entity_type == last_type, 1 + rng.integers(0, 5, n_ent), 0)
    ent_cat = np.stack([entity_cluster + 1, brand, price_level, anchor], axis=1).astype(np.int32)
    shop_rating = np.where(entity_type == min(1, last_type), rng.standard_normal(n_ent), 0.0)
    duration = np.where(entity_type == min(2, last_type), rng.standard_normal(n_ent), 0.0)
    ent_num = np.stack(
        [(log_pop - log_pop.mean()) / (log_pop.std() + 1e-9), (price_raw - price_raw.mean()) / (price_raw.std() + 1e-9), shop_rating, duration],
        axis=1,
    ).astype(np.float32)

    type_names = np.asarray(cfg.entity_types)
    width = len(str(n_ent))
    ent_ids = np.char.add(np.char.add(type_names[entity_type], "-"), np.char.zfill(np.arange(n_ent).astype(str), width))
    all_domains = np.uint64((1 << K) - 1) if K < 64 else np.uint64(np.iinfo(np.uint64).max)
    return Entities(
        external_id=ent_ids,
        entity_type=entity_type,
        cat=ent_cat,
        num=ent_num,
        domain_mask=np.full(n_ent, all_domains, dtype=np.uint64),
    )


def generate(
    cfg: SynthConfig, out: Path, *, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Generate the dataset described by ``cfg`` and write it atomically to ``out``.

    The steps draw from one random generator in a fixed order (catalogue, domains, users,
    interactions, user features, entity features), so a seed gives the same bytes.

    Args:
        cfg: sizes, knobs and seed.
        out: destination dataset directory (replaced atomically if it exists).
        progress: optional callback ``(users_done, users_total)`` for a progress bar.
    """
    if cfg.num_users < 1 or cfg.num_entities < len(cfg.entity_types) or cfg.num_interactions < cfg.num_users:
        raise ValueError("need >= 1 user, >= 1 entity per type and >= 1 interaction per user")
    rng = np.random.default_rng(cfg.seed)
    cat = _catalogue(cfg, rng)
    taste = _domain_taste(cfg, rng, cat)
    people = _population(cfg, rng)
    interactions = _interactions(cfg, rng, cat, taste, people, progress)
    users = _users(cfg, rng, people)
    entities = _entities(cfg, rng, cat)
    return write_dataset(
        out,
        schema=synth_schema(cfg, cat.num_clusters),
        users=users,
        entities=entities,
        interactions=interactions,
        meta={
            "source": "synthetic",
            "generator": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
            "num_clusters": cat.num_clusters,
        },
    )
