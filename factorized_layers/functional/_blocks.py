"""Chains of thin GEMMs run on blocks of rows whose intermediates stay in cache.

A factor chain (Tucker's rotation chain, tensor-train cores) reads and writes an
intermediate per GEMM; over a large batch those no longer fit in cache and the chain
becomes memory-bound. Run on blocks of rows, it keeps its small-batch speed.
Measured on 2 CPU threads (medians of interleaved rounds):

* Tucker, 384 -> 1536, ranks (12, 9, 7 | 8, 8, 6): one piece 0.76x dense at batch 1024
  and 1.12x at 4096 (0.60--0.95x in other runs), in blocks of 128 rows 1.18x and 1.19x;
  blocks of 32--256 rows were within 5% of each other, 512 fell back to 0.66--0.97x.
* Tensor train, 384 -> 1536 as (16, 24) -> (48, 32), rank 16, last core first: 0.24x /
  0.32x dense at batch 1024 / 4096 in one piece, 0.60x / 0.70x in blocks of 64 rows.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..contract import shape_free_schedule

CACHE_BYTES = 1 << 20
"""Bytes the widest intermediate of one block may take (about a core's L2 cache)."""

MIN_BLOCK_ROWS = 64
"""Fewer rows per block cost more in per-call overhead than the cache saves."""


def block_rows(widest: int, element_size: int) -> int:
    """The power of two of rows (at least :data:`MIN_BLOCK_ROWS`) whose widest
    intermediate, ``widest`` elements per row, fits :data:`CACHE_BYTES`."""
    rows = max(CACHE_BYTES // (widest * element_size), MIN_BLOCK_ROWS)
    return 1 << (rows.bit_length() - 1)


def in_row_blocks(
    rows: torch.Tensor,
    out_features: int,
    block: Callable[[], int],
    chain: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``chain(rows)`` (``(n, in) -> (n, out_features)``), run on blocks of ``block()``
    rows when ``n`` holds at least two.

    Compiled or exported graphs run in one piece (the compiler plans their memory), and
    ``block`` is only called outside them (it may be an ``lru_cache``).
    """
    if shape_free_schedule() or torch.compiler.is_compiling():
        return chain(rows)
    size = block()
    if rows.shape[0] < 2 * size:
        return chain(rows)
    output = rows.new_empty(rows.shape[0], out_features)
    for start in range(0, rows.shape[0], size):
        output[start : start + size] = chain(rows[start : start + size])
    return output
