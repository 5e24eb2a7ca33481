"""`bench search` without --k on a catalogue smaller than the default k: capped, with a message."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.bench.search_bench import BenchConfig, BenchError, run_search_bench
from tests.fixtures.fake_bundle import make_fake_bundle, make_fake_dataset


def test_default_k_is_capped_at_the_smallest_domain(tmp_path: Path) -> None:
    bundle = make_fake_bundle(tmp_path / "bundle", num_entities=300, dim=8, seed=1)
    data = make_fake_dataset(tmp_path / "data", bundle, num_users=20)
    messages: list[str] = []
    res = run_search_bench(BenchConfig(bundle=bundle, data=data, users=5, sweep=False, cap_ks=True), log=messages.append)
    ks = [int(k) for k in res["k"]]
    # 50 fits; 200 and 1000 both become the smallest domain's size (one k, not two equal ones)
    assert len(ks) == 2 and ks[0] == 50 and 50 < ks[1] < 200
    assert any(f"default k capped at {ks[1]}" in m for m in messages)
    # an explicit k is the user's choice: still refused, not silently changed
    with pytest.raises(BenchError, match="exceeds"):
        run_search_bench(BenchConfig(bundle=bundle, data=data, users=5, sweep=False), log=messages.append)
