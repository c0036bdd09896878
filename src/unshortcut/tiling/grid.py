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


def thumbnail_factor(size: int, stride: int, height: int, width: int) -> int:
    """Downsample of the tissue-detection thumbnail accumulated while tiling.

    It divides both patch size and stride, so every patch covers whole thumbnail pixels
    and tissue ratios are exact means over thumbnail pixels. It is the smallest such
    divisor that keeps the thumbnail within ``THUMBNAIL_MAX_SIDE`` pixels a side: the
    tissue ratio is the attribute the shortcut lives in, so it is measured as finely as
    a bounded thumbnail allows (a 20,000 px slide with 256 px patches: 1/8, so each
    patch spans 32 x 32 thumbnail pixels).
    """
    common = math.gcd(size, stride)
    divisors = [d for d in range(1, common + 1) if common % d == 0]
    for d in divisors:
        if max(height, width) / d <= THUMBNAIL_MAX_SIDE:
            return d
    return divisors[-1]


def to_channels_first_float(band: np.ndarray) -> torch.Tensor:
    """(h, w, C) numpy -> (1, C, h, w) float32 tensor (channels-last memory, no copy first)."""
    tensor = torch.from_numpy(np.ascontiguousarray(band))
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(-1)
    return tensor.permute(2, 0, 1).unsqueeze(0).to(torch.float32)


def block_mean(tensor: torch.Tensor, factor: int) -> torch.Tensor:
    """Mean over non-overlapping ``factor`` x ``factor`` blocks of a (1, C, h, w) tensor."""
    if factor == 1:
        return tensor
    return F.avg_pool2d(tensor, kernel_size=factor, stride=factor)


def area_resize(patches: torch.Tensor, input_size: int) -> torch.Tensor:
    """Area-average (N, C, P, P) patches to (N, C, S, S); equals the block mean when S | P."""
    return F.adaptive_avg_pool2d(patches.to(torch.float32), input_size)


def cast_pixels(values: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """Averaged pixels back in the source dtype: integers are rounded and clipped."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = values.round().clamp_(info.min, info.max)
    return values.numpy().astype(dtype, copy=False)


def tumor_mask_uint8(fractions: torch.Tensor) -> np.ndarray:
    """Per-input-pixel tumor fraction stored as uint8 = round(255 * fraction)."""
    return (fractions * 255.0).round().clamp_(0, 255).numpy().astype(np.uint8)


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
