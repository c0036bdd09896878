"""Heat maps on a thumbnail: per-patch values, pixel-level probabilities, overlays.

Everything here lives at *overlay resolution*: the image's thumbnail fitted into a
given longest side, ``downsample`` level-0 pixels per overlay pixel. Per-patch values
are looked up per overlay pixel (the grid cell that holds the pixel's centre), so a
heat map costs one gather whatever the number of patches; pixel-level maps (models
with a decoder) are accumulated patch by patch at that resolution, overlapping
patches averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image

from unshortcut.tiling.grid import Grid

#: Colour maps: tumor probability (blue 0 .. red 1); shaky ground (pale .. dark red).
PROBABILITY_COLORS = "RdYlBu_r"
SHAKY_COLORS = "YlOrRd"
#: Opacity of a heat map over the thumbnail where patches were scored.
ALPHA = 0.55


@dataclass(frozen=True)
class Canvas:
    """The overlay's pixel grid: ``shape`` (h, w) and level-0 pixels per overlay pixel."""

    shape: tuple[int, int]
    downsample: float

    @classmethod
    def fit(cls, extent: tuple[int, int], longest_side: int, finest: float = 1.0) -> Canvas:
        """A canvas over a level-0 ``extent`` (h, w) whose longer side is at most
        ``longest_side`` pixels and no finer than ``finest`` level-0 pixels per pixel
        (the thumbnail's: upsampling it would add pixels, not detail)."""
        downsample = max(1.0, finest, max(extent) / longest_side)
        shape = (max(1, round(extent[0] / downsample)), max(1, round(extent[1] / downsample)))
        return cls(shape, downsample)


def display_rgb(thumbnail: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 for display from a thumbnail of any channels and dtype.

    8-bit RGB stays as it is; anything else (grey, multiplexed, 16-bit, float) is
    scaled per channel to its 1st-99th percentiles and shown as grey (the mean of the
    channels), as tissue detection sees it.
    """
    pixels = np.asarray(thumbnail)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[-1] == 3 and pixels.dtype == np.uint8:
        return pixels
    grey = np.zeros(pixels.shape[:2], np.float32)
    for channel in np.moveaxis(pixels.astype(np.float32), -1, 0):
        low, high = np.percentile(channel, [1, 99])
        if high > low:
            grey += np.clip((channel - low) / (high - low), 0, 1)
    grey = grey / pixels.shape[-1]
    return np.repeat((grey * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=2)


def resized(rgb: np.ndarray, canvas: Canvas) -> np.ndarray:
    """An RGB thumbnail resampled (area average) onto the canvas."""
    height, width = canvas.shape
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BOX))


def patch_map(values: np.ndarray, grid: Grid, downsample: int, canvas: Canvas) -> np.ndarray:
    """(h, w) float map of per-grid-position ``values`` (row-major, NaN = not scored).

    Each overlay pixel takes the value of the grid cell that holds its centre, when
    the centre lies inside that cell's patch; elsewhere NaN. With overlapping patches
    (stride < size) a pixel shows the last patch that starts above-left of it.
    """
    stride, size = grid.stride * downsample, grid.size * downsample
    height, width = canvas.shape
    ys = (np.arange(height) + 0.5) * canvas.downsample
    xs = (np.arange(width) + 0.5) * canvas.downsample
    rows, cols = np.floor(ys / stride).astype(np.int64), np.floor(xs / stride).astype(np.int64)
    row_ok = (rows < grid.rows) & (ys - rows * stride < size)
    col_ok = (cols < grid.cols) & (xs - cols * stride < size)
    table = values.reshape(grid.rows, grid.cols)
    out = np.full(canvas.shape, np.nan, np.float32)
    out[np.ix_(row_ok, col_ok)] = table[np.ix_(rows[row_ok], cols[col_ok])]
    return out


class PixelMapAccumulator:
    """Mean of per-pixel probability maps of many patches, at canvas resolution."""

    def __init__(self, canvas: Canvas) -> None:
        self.canvas = canvas
        self.total = np.zeros(canvas.shape, np.float32)
        self.count = np.zeros(canvas.shape, np.float32)

    def add(self, maps: torch.Tensor, ys: np.ndarray, xs: np.ndarray, size: int) -> None:
        """(B, S, S) probabilities of patches with level-0 corners (ys, xs) and side."""
        scale = self.canvas.downsample
        side = max(1, round(size / scale))
        mode = "area" if side < maps.shape[-1] else "nearest"
        small = F.interpolate(maps[:, None].float(), size=(side, side), mode=mode)[:, 0]
        small = small.cpu().numpy()
        height, width = self.canvas.shape
        for patch, y, x in zip(small, ys.tolist(), xs.tolist(), strict=True):
            top, left = round(y / scale), round(x / scale)
            h, w = min(side, height - top), min(side, width - left)
            if h > 0 and w > 0:
                self.total[top : top + h, left : left + w] += patch[:h, :w]
                self.count[top : top + h, left : left + w] += 1

    def mean(self) -> np.ndarray:
        """(h, w) float32 mean probability; NaN where no patch was scored."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.total / self.count, np.nan).astype(np.float32)


def overlay(base: np.ndarray, values: np.ndarray, colors: str) -> np.ndarray:
    """``base`` (h, w, 3) uint8 with ``values`` in [0, 1] (NaN: untouched) blended over it.

    Colours come from a 256-entry table of the colour map, so the cost is a gather over
    the scored pixels only.
    """
    table = colormaps[colors](np.linspace(0, 1, 256))[:, :3].astype(np.float32) * 255
    defined = np.isfinite(values)
    index = np.round(np.clip(values[defined], 0, 1) * 255).astype(np.int64)
    out = base.copy()
    mixed = (1 - ALPHA) * base[defined].astype(np.float32) + ALPHA * table[index]
    out[defined] = (mixed + 0.5).astype(np.uint8)
    return out


def save_png(path: Path, rgb: np.ndarray) -> None:
    """A PNG with fast compression (an overlay is written once, read by a person)."""
    Image.fromarray(rgb).save(path, format="PNG", compress_level=1)


def fit_extent(thumbnail_shape: tuple[int, int], thumbnail_downsample: float) -> tuple[int, int]:
    """Level-0 extent (h, w) a thumbnail covers."""
    return (
        math.ceil(thumbnail_shape[0] * thumbnail_downsample),
        math.ceil(thumbnail_shape[1] * thumbnail_downsample),
    )
