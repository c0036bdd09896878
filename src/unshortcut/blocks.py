"""Exact block sums: the one reduction every decoded pixel goes through while tiling.

Patches are shrunk by an integer factor with a plain block mean, tumor fractions are
counts of mask pixels per block, and the tissue thumbnail is a coarser block mean of
the same sums. Summing in small integer accumulators keeps all of them exact (no float
rounding differs between the pixel store, the masks and the thumbnail) and cheap.
The readers apply it to each tile right after decoding it (in the decode threads,
while the tile is still in cache), which is why it lives outside ``tiling``.
"""

from __future__ import annotations

import numpy as np


def accumulators(dtype: np.dtype, factor: int) -> tuple[type, type]:
    """Exact accumulator dtypes for summing ``factor`` rows, then ``factor`` columns."""
    if dtype == np.bool_ or (dtype.kind == "u" and dtype.itemsize == 1):
        row_acc = np.uint16 if factor <= 257 else np.uint32
        return row_acc, (np.uint16 if factor <= 16 else np.uint32)
    if dtype.kind == "u" and dtype.itemsize == 2 and factor <= 256:
        return np.uint32, np.uint32  # 256 * 256 * 65535 < 2**32
    if dtype.kind == "u":
        return np.uint64, np.uint64
    if dtype.kind == "i":
        return np.int64, np.int64
    return np.float64, np.float64


def block_sum(values: np.ndarray, factor: int) -> np.ndarray:
    """Exact sums over ``factor`` x ``factor`` blocks of (h, w, ...) ``values``.

    ``h`` and ``w`` must be multiples of ``factor``. Written as ``factor`` strided
    additions of whole rows, then of columns, in small integer accumulators: an order
    of magnitude faster than converting to float and pooling.
    """
    height, width = values.shape[:2]
    rest = values.shape[2:]
    row_acc, col_acc = accumulators(values.dtype, factor)
    rows = values.reshape(height // factor, factor, width, *rest)
    summed = (
        rows[:, 0].astype(row_acc) if factor == 1 else np.add(rows[:, 0], rows[:, 1], dtype=row_acc)
    )
    for i in range(2, factor):
        summed += rows[:, i]
    cols = summed.reshape(height // factor, width // factor, factor, *rest)
    if factor == 1:
        return cols[:, :, 0].astype(col_acc)
    total = np.add(cols[:, :, 0], cols[:, :, 1], dtype=col_acc)
    for i in range(2, factor):
        total += cols[:, :, i]
    return total
