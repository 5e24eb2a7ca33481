"""``service.hugepages``: arrays in anonymous memory advised for huge pages, equal to what they replace."""

from __future__ import annotations

import numpy as np

from service.hugepages import huge_copy, huge_zeros


def test_huge_zeros_is_zeroed_writable_and_aligned() -> None:
    a = huge_zeros((3_000_000,), np.uint32)
    assert a.dtype == np.uint32 and a.shape == (3_000_000,) and a.flags.c_contiguous and a.flags.writeable
    assert not a.any()
    assert a.ctypes.data % (2 << 20) == 0  # whole 2 MiB extents: what a huge page needs
    a[::1000] = 7
    assert int(a.sum()) == 7 * 3000


def test_huge_copy_has_the_same_bytes_and_is_read_only() -> None:
    src = np.random.default_rng(0).normal(size=(1000, 3, 5)).astype(np.float32)
    c = huge_copy(src[::2])  # a strided source: the copy is C-contiguous
    np.testing.assert_array_equal(c, src[::2])
    assert c.dtype == src.dtype and c.flags.c_contiguous and not c.flags.writeable
    e = huge_copy(np.zeros((0, 4), np.int64))
    assert e.shape == (0, 4)


def test_an_engine_in_huge_pages_answers_byte_for_byte_like_one_without(tmp_path) -> None:
    from contracts.bundle import load_bundle
    from contracts.features import UserFeatures
    from service.engine import MatchEngine
    from tests.fixtures.fake_bundle import make_fake_bundle

    bundle = load_bundle(make_fake_bundle(tmp_path / "bundle", num_entities=3000, seed=3))
    plain = MatchEngine(bundle, providers=["CPUExecutionProvider"])
    huge = MatchEngine(bundle, providers=["CPUExecutionProvider"], huge_pages=True)
    assert huge.huge_pages and not huge.graph.offsets[0].flags.writeable
    u = UserFeatures.cold_start(bundle.schema)
    for d in range(bundle.schema.num_domains):
        for k in (10, 100):
            for mode in ("graph", "exhaustive"):
                a, b = plain.match(u, d, k, mode=mode), huge.match(u, d, k, mode=mode)
                np.testing.assert_array_equal(a.rows, b.rows)
                np.testing.assert_array_equal(a.scores, b.scores)
