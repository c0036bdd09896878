"""Patch-grid geometry, area resizing and the labelling rule.

Everything here works on small arrays and knows nothing about files, so the numbers
the patch set records (positions, tumor fractions, labels, resized pixels) can be
checked against hand-computed cases without any image reader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from unshortcut.errors import UnshortcutError


@dataclass(frozen=True)
class Grid:
    """Top-left corners of every whole patch that fits in an image (level pixels).

    Only whole patches are cut: a partial patch at the right or bottom border would
    need padding, and padded pixels would look like glass to the model.
    """

    height: int
    width: int
    size: int
    stride: int

    @property
    def rows(self) -> int:
        return (self.height - self.size) // self.stride + 1

    @property
    def cols(self) -> int:
        return (self.width - self.size) // self.stride + 1

    @property
    def ys(self) -> np.ndarray:
        return np.arange(self.rows, dtype=np.int64) * self.stride

    @property
    def xs(self) -> np.ndarray:
        return np.arange(self.cols, dtype=np.int64) * self.stride

    @property
    def covered_height(self) -> int:
        """Rows from the top down to the bottom edge of the last patch row."""
        return (self.rows - 1) * self.stride + self.size

    @property
    def covered_width(self) -> int:
        return (self.cols - 1) * self.stride + self.size


def make_grid(height: int, width: int, size: int, stride: int, source: str) -> Grid:
    """The grid for an image of ``height`` x ``width``; ``source`` names it in errors."""
    if size < 1 or stride < 1:
        raise UnshortcutError(f"--patch-size/--stride: must be positive (got {size}/{stride})")
    if size > height or size > width:
        raise UnshortcutError(
            f"{source}: patch size {size} is larger than the image ({height} x {width} px)"
        )
    return Grid(height=height, width=width, size=size, stride=stride)


def pool_factor(size: int, stride: int, input_size: int) -> int | None:
    """Block side that turns a patch into its input-size version by a plain block mean.

    Returns None when the patch side is not a multiple of the input size, or the stride
    does not land on block boundaries; the caller then resizes patch by patch with
    adaptive pooling, which gives the same area average for non-integer footprints.
    """
    if size % input_size:
        return None
    factor = size // input_size
    return factor if stride % factor == 0 else None


#: Longest side of the tissue-detection thumbnail accumulated while tiling.
THUMBNAIL_MAX_SIDE = 4096
#: A thumbnail this small is never coarsened further.
THUMBNAIL_PIXELS = 1024 * 1024


def thumbnail_factor(size: int, stride: int, height: int, width: int) -> int:
    """Downsample of the tissue-detection thumbnail accumulated while tiling.

    It divides both patch size and stride, so every patch covers whole thumbnail pixels
    and tissue ratios are exact means over thumbnail pixels. It is the smallest such
    divisor that either gives each patch at most 16 x 16 thumbnail pixels (256 steps of
    tissue ratio, finer than any tissue outline) or already leaves a thumbnail of at
    most ``THUMBNAIL_PIXELS`` pixels, and that keeps the thumbnail within
    ``THUMBNAIL_MAX_SIDE`` pixels a side: detection cost grows with thumbnail area.
    """
    common = math.gcd(size, stride)
    divisors = [d for d in range(1, common + 1) if common % d == 0]
    for d in divisors:
        fine_enough = d * 16 >= size or height * width / d**2 <= THUMBNAIL_PIXELS
        if fine_enough and max(height, width) / d <= THUMBNAIL_MAX_SIDE:
            return d
    return divisors[-1]


def windows(pooled: np.ndarray, input_size: int, step: int) -> np.ndarray:
    """Pooled band (S, w[, C]) -> views of patches (cols[, C], S, S) every ``step`` columns."""
    view = np.lib.stride_tricks.sliding_window_view(pooled, input_size, axis=1)[:, ::step]
    return view.transpose(1, 2, 0, 3) if pooled.ndim == 3 else view.transpose(1, 0, 2)


def mean_from_sums(sums: np.ndarray, count: int, dtype: np.dtype) -> np.ndarray:
    """Block means from exact block sums, in ``dtype``.

    Integer pixels are rounded half up in integer arithmetic, exact and cheap (equal to
    ``floor(sums / count + 0.5)``); floating point pixels are divided. ``sums`` must be
    sums of ``count`` values of ``dtype``: that bound, not a scan of the data, decides
    whether the accumulator has room for the rounding offset.
    """
    dtype = np.dtype(dtype)
    if dtype.kind not in "uib":
        return (sums / count).astype(dtype)
    largest = 1 if dtype.kind == "b" else int(np.iinfo(dtype).max)
    if count * largest + count // 2 > np.iinfo(sums.dtype).max:
        sums = sums.astype(np.int64)
    rounded = sums + count // 2
    if count & (count - 1) == 0:  # a power of two: shift instead of dividing
        rounded >>= count.bit_length() - 1
    else:
        rounded //= count
    return rounded.astype(dtype)


def crops(band: np.ndarray, xs: np.ndarray, size: int) -> np.ndarray:
    """(h, w, C) band -> (cols, C, h, size) patches at columns ``xs``."""
    return np.stack([band[:, x : x + size].transpose(2, 0, 1) for x in xs.tolist()])


def area_resize(patches: np.ndarray, input_size: int) -> np.ndarray:
    """Area-average (N, C, P, P) patches to (N, C, S, S) float32 for any P and S.

    For non-integer footprints (P not a multiple of S) each output pixel averages the
    input pixels its footprint touches (torch ``adaptive_avg_pool2d``); when S divides
    P this equals the block mean.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32))
    return F.adaptive_avg_pool2d(tensor, input_size).numpy()


def to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Averaged pixels back in the source dtype: integers rounded half up and clipped."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        values = np.clip(np.floor(values + 0.5), info.min, info.max)
    return values.astype(dtype)


def tumor_mask_uint8(fractions: np.ndarray) -> np.ndarray:
    """Per-input-pixel tumor fraction stored as uint8 = round(255 * fraction), half up."""
    return np.clip(np.floor(fractions * 255.0 + 0.5), 0, 255).astype(np.uint8)


def labels_from_fractions(
    tumor_fraction: np.ndarray, min_tumor_fraction: float | None
) -> np.ndarray:
    """Label 1 for tumor patches.

    Default (None): any tumor pixel makes a tumor patch (the paper's rule). With a
    threshold f, label 1 when ``tumor_fraction >= f``.
    """
    if min_tumor_fraction is None:
        return (tumor_fraction > 0).astype(np.int64)
    return (tumor_fraction >= min_tumor_fraction).astype(np.int64)
