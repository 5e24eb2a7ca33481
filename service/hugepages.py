"""Arrays in transparent huge pages, for the search's randomly read per-row arrays.

A graph query at 1M rows reads a few thousand random rows of arrays of 4-128 MB each (the per-row
seen / scored stamps and score cache, the CSR lists, the domain mask, the entity tables). With 4 KiB
pages nearly every such read also misses the TLB, and the page walk is itself a chain of dependent
loads; 2 MiB pages cover a 128 MB table with 64 TLB entries. Measured on this host (AMD EPYC, 2 cores,
``benchmarks/gather_tlb.py``, docs/search-benchmark.md "Seventh session"): a random
128-byte row gather from a 1M-row table after the caches are evicted costs 107-110 ns from the bundle's
memory map, 76-79 ns from anonymous 4 KiB pages and 71-72 ns from huge pages (an earlier version of the
script: 126, 118 and 84 ns), so the private copy is most of the gain.

Linux backs a file's memory map with small pages (the page cache), and anonymous memory with huge
pages only where ``madvise(MADV_HUGEPAGE)`` asks for them (``transparent_hugepage/enabled`` =
``madvise``, the common default) or the system says ``always``. So the arrays are copied into an
anonymous mapping with that advice. The copy is private to the process: a replica no longer shares
those pages with the others through the page cache, which is why it is an engine option.
"""

from __future__ import annotations

import mmap

import numpy as np

_HUGE = 2 << 20  # the x86-64 / arm64 transparent huge page


def huge_empty(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised C-contiguous array in an anonymous mapping advised for huge pages (small pages
    where the kernel offers none: the advice is a hint, never an error)."""
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    # The mapping from a 2 MiB boundary: only whole aligned 2 MiB extents can be huge pages.
    m = mmap.mmap(-1, max(nbytes, 1) + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    buf = np.frombuffer(m, dtype=np.uint8)  # keeps ``m`` alive as the array's base
    start = (-buf.ctypes.data) % _HUGE
    return buf[start : start + nbytes].view(dt).reshape(shape)


def huge_zeros(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """``np.zeros`` in huge pages (an anonymous mapping reads as zeros until written)."""
    return huge_empty(shape, dtype)


def huge_copy(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``a`` in huge pages, read-only like the memory maps it replaces."""
    out = huge_empty(a.shape, a.dtype)
    out[...] = a
    out.flags.writeable = False
    return out
