"""The workload and the answer check of the Locust load test, free of Locust (and of gevent's monkey
patching) so that the runner's engine-alone measurement and the unit tests can import them.
Standard library only: it also runs in the stock ``locustio/locust`` image next to locustfile.py."""

from __future__ import annotations

import bisect
import itertools
import random
from typing import Any


def parse_mix(text: str, cast: type = str) -> list[tuple[Any, float]]:
    """``"a:0.7,b:0.3"`` -> [("a", 0.7), ("b", 0.3)]; a bare ``"a,b"`` gets equal weights."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.rpartition(":") if ":" in part else (part, "", "1")
        w = float(weight)
        if w < 0:
            raise ValueError(f"negative weight in mix {text!r}")
        out.append((cast(name), w))
    if out and sum(w for _, w in out) <= 0:
        raise ValueError(f"mix {text!r} has no positive weight")
    return out


def check_answer(status: int, body: Any, *, domain: str, k: int, eligible: int | None) -> str | None:
    """Why an answer to ``POST /match`` is wrong, or None when it is right."""
    if status != 200:
        return f"HTTP {status}"
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        return "no items list in the answer"
    items = body["items"]
    if body.get("domain") not in (None, domain):
        return f"answered domain {body.get('domain')!r}, asked {domain!r}"
    if len(items) > k:
        return f"{len(items)} items for k={k}"
    expected = k if eligible is None else min(k, eligible)
    if len(items) < expected and not body.get("partial"):
        return f"{len(items)} items for k={k} ({eligible} eligible), not flagged partial"
    ids = [it.get("entity_id") for it in items]
    if len(set(ids)) != len(ids):
        return "duplicate entity ids"
    scores = [it.get("score") for it in items]
    if any(not isinstance(s, int | float) for s in scores):
        return "missing scores"
    if any(a < b for a, b in itertools.pairwise(scores)):
        return "items not best first"
    return None


class Workload:
    """Draws (user id, domain, k): Zipf-skewed known users, a share of unknown ones, domain and k mixes."""

    def __init__(
        self,
        user_ids: list[str],
        domains: list[tuple[str, float]],
        ks: list[tuple[int, float]],
        *,
        zipf_s: float = 1.1,
        unknown: float = 0.05,
        seed: int = 0,
    ) -> None:
        if not user_ids:
            raise ValueError("the user id list is empty")
        if not domains or not ks:
            raise ValueError("empty domain or k mix")
        rng = random.Random(seed)
        # Popularity rank is independent of the id order of the file: shuffle, then rank 1 = most active.
        self.users = list(user_ids)
        rng.shuffle(self.users)
        self.user_cum = list(itertools.accumulate(1.0 / (r**zipf_s) for r in range(1, len(self.users) + 1)))
        self.domains, self.domain_cum = [d for d, _ in domains], list(itertools.accumulate(w for _, w in domains))
        self.ks, self.k_cum = [k for k, _ in ks], list(itertools.accumulate(w for _, w in ks))
        self.unknown = unknown

    @staticmethod
    def _pick(rng: random.Random, values: list, cum: list[float]) -> Any:
        return values[min(bisect.bisect_right(cum, rng.random() * cum[-1]), len(values) - 1)]

    def draw(self, rng: random.Random) -> tuple[str, str, int, bool]:
        known = rng.random() >= self.unknown
        user = self._pick(rng, self.users, self.user_cum) if known else f"loadtest-unknown-{rng.getrandbits(48):x}"
        return user, self._pick(rng, self.domains, self.domain_cum), self._pick(rng, self.ks, self.k_cum), known


def read_user_ids(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]
