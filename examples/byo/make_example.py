"""Writes the small worked example of the bring-your-own import (events.csv, users.csv, ads.csv).

A toy ad log in the shape a real one has: ads of three entity types (image, video, live) shown in
three placements (the domains), users with a profile, type-specific ad columns (a video's duration, a
live stream's anchor level), a few missing values. Deterministic; run from the repo root:

    .venv/bin/python examples/byo/make_example.py
"""

from __future__ import annotations

import csv
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np


def main(out: Path | None = None) -> None:
    out = out if out is not None else Path(__file__).resolve().parent
    rng = np.random.default_rng(7)
    n_users, n_ads, n_events = 30, 40, 400
    types = rng.choice(["image", "video", "live"], size=n_ads, p=[0.6, 0.25, 0.15])
    categories = ["shoes", "phones", "games", "food"]
    with open(out / "ads.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["ad_id", "ad_type", "category", "price", "duration_s", "anchor_level"])
        for a in range(n_ads):
            t = types[a]
            price = "" if a % 13 == 5 else f"{rng.lognormal(3.0, 0.8):.2f}"  # a few prices missing
            duration = f"{rng.integers(6, 60)}" if t == "video" else ""
            anchor = str(rng.choice(["bronze", "silver", "gold"])) if t == "live" else ""
            w.writerow([f"ad{a:03d}", t, categories[a % 4], price, duration, anchor])
    with open(out / "users.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["user_id", "gender", "age_group", "tenure_days"])
        for u in range(n_users):
            gender = "" if u % 11 == 3 else str(rng.choice(["f", "m"]))
            w.writerow([f"user{u:02d}", gender, str(rng.choice(["18-24", "25-34", "35+"])), int(rng.integers(1, 900))])
    start = datetime(2026, 11, 1, tzinfo=UTC)
    with open(out / "events.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["user_id", "ad_id", "placement", "ts"])
        users = np.sort(rng.integers(0, n_users, n_events))
        for u in users:
            ad = int(rng.zipf(1.6) - 1) % n_ads  # popularity skew
            when = start + timedelta(seconds=int(rng.integers(0, 14 * 86400)))
            place = str(rng.choice(["feed", "search", "video_tab"], p=[0.5, 0.3, 0.2]))
            w.writerow([f"user{u:02d}", f"ad{ad:03d}", place, when.isoformat().replace("+00:00", "Z")])


if __name__ == "__main__":
    main()
