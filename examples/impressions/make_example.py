"""Writes a small ad-impression log in the shape ad servers dump it, for the worked example.

``impressions``: no header, no file extension, tab-separated, one row per impression with a click
flag (about one impression in five is clicked), a request time; ``users.csv`` with a sign-up date
written as ``YYYYMMDD``; ``ads.csv`` with two ad types (banner, video), a category, a price and a
creation date and a pipe-separated tag list (``sale|new``). Users prefer some categories, so clicks carry signal a model can learn. Videos are
only ever shown in the feed. Deterministic; run from the repo root::

    .venv/bin/python examples/impressions/make_example.py [--out DIR]

The files are generated, not committed (see .gitignore here).
"""

from __future__ import annotations

import argparse
import csv
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np

CATEGORIES = ("shoes", "phones", "games", "food", "travel", "books")
TAGS = ("sale", "new", "premium", "local", "bundle", "eco")


def main(out: Path | None = None, *, n_users: int = 200, n_ads: int = 120, per_user: int = 40, seed: int = 11) -> Path:
    out = out if out is not None else Path(__file__).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ad_type = rng.choice(["banner", "video"], size=n_ads, p=[0.7, 0.3])
    ad_cat = rng.integers(0, len(CATEGORIES), n_ads)
    with open(out / "ads.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["ad_id", "ad_type", "category", "price", "created", "tags"])
        for a in range(n_ads):
            created = date(2026, 9, 1) + timedelta(days=int(rng.integers(0, 60)))
            tags = "|".join(rng.choice(TAGS, size=int(rng.integers(0, 4)), replace=False).tolist())  # 0-3 tags
            w.writerow([f"ad{a:03d}", ad_type[a], CATEGORIES[ad_cat[a]], f"{rng.lognormal(2.5, 0.6):.2f}",
                        created.isoformat(), tags])  # fmt: skip
    # each user likes two categories: clicks on them are ~6x likelier
    likes = np.stack([rng.choice(len(CATEGORIES), 2, replace=False) for _ in range(n_users)])
    with open(out / "users.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["user_id", "gender", "signup"])
        for u in range(n_users):
            signup = date(2024, 1, 1) + timedelta(days=int(rng.integers(0, 900)))
            w.writerow([f"u{u:04d}", "" if u % 17 == 4 else str(rng.choice(["f", "m"])), signup.strftime("%Y%m%d")])
    start = datetime(2026, 11, 2, tzinfo=UTC)
    banners = np.flatnonzero(ad_type == "banner")
    rows = []
    for u in range(n_users):
        for _ in range(per_user):
            placement = "feed" if rng.random() < 0.6 else "search"
            ad = int(rng.integers(0, n_ads)) if placement == "feed" else int(rng.choice(banners))
            p_click = 0.45 if ad_cat[ad] in likes[u] else 0.07
            when = start + timedelta(seconds=int(rng.integers(0, 21 * 86400)))
            rows.append((when, f"u{u:04d}", f"ad{ad:03d}", placement, int(rng.random() < p_click)))
    rows.sort()
    with open(out / "impressions", "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        for when, user, ad, placement, clk in rows:
            w.writerow([when.strftime("%Y-%m-%d %H:%M:%S"), user, ad, placement, clk])
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="folder (default: next to this script)")
    args = p.parse_args()
    print(f"wrote {main(args.out)}")
