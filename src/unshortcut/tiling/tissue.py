"""Tissue masks at thumbnail resolution and exact tissue fractions of patches.

Tissue is found on a thumbnail (one small pyramid level, or a block mean streamed from
the full image), never on full-resolution pixels: a whole slide at 40x is 10^9 pixels,
its thumbnail 10^6, and the tissue outline is far coarser than a patch.

Detection (:func:`detect_tissue_from_thumbnail`)
    1. Each channel is scaled to [0, 1] between its 1st and 99th percentile, so that a
       faint channel of a multiplexed image weighs as much as a bright one; the mean over
       channels is one grey image.
    2. Otsu's threshold (or a fixed one) splits it into a bright and a dark side.
    3. Polarity: which side is background. Brightfield (H&E) has bright glass, whereas
       fluorescence and nonlinear multimodal images (CARS, TPEF, SHG) have a dark
       background. ``auto`` takes the side that holds at least two thirds of the pixels
       in a ring along the image border (slides are rarely cut to the tissue), and when
       the border is mixed, the side with most pixels overall (glass usually dominates a
       slide). Failure modes: tissue that fills the whole border *and* most of the image
       (a region of interest cut from a tumor, BCSS-like) has no background, and Otsu then
       splits tissue into a light and a dark part. Real background (glass, or an empty
       dark field) is flat, so ``auto`` also requires the background side to be narrow:
       its interquartile range at most ``BACKGROUND_SPREAD`` times the distance between
       the two class means (CAMELYON16 slide on glass: 0.14; BCSS and OCDC tissue-only
       crops: 0.27-0.53), and otherwise calls the whole image tissue (polarity
       ``none``). A textured or unevenly lit background can fail this test; set
       ``polarity``, give a precomputed ``tissue/`` mask, or skip tissue filtering.
       A fixed threshold (method ``threshold``) is the user's word on where background
       ends, so neither test overrules it: on an image filled with tissue the border
       and majority sides are tissue, and the flatness test would call everything
       tissue, which is exactly what a user who sets a threshold there does not want.
       With ``auto`` polarity the threshold itself says which side is background: a
       cut at 0.5 or above is set just under bright glass (brightfield), a cut below
       0.5 just over a dark field (fluorescence, multimodal).
    4. Clean-up: a closing (radius in thumbnail pixels) joins fragmented tissue, then
       objects and holes smaller than ``min_object_px`` x ``min_object_px`` full-resolution
       pixels are removed and filled.

Fractions (:meth:`TissueMask.fractions`)
    Each mask pixel stands for a ``downsample`` x ``downsample`` square of the image, with
    uniform coverage. The tissue area of any full-resolution square is the integral of
    that piecewise-constant function, which is exactly the bilinear interpolation of the
    summed-area table at the square's corners; partially covered mask pixels count by
    their overlap area. Vectorised, this is a few array operations per batch of squares.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage

from unshortcut.errors import UnshortcutError
from unshortcut.io.base import ImageReader
from unshortcut.io.masks import open_mask
from unshortcut.io.readers import block_band_rows, iter_bands

Polarity = Literal["auto", "bright-background", "dark-background"]
Method = Literal["otsu", "threshold"]

#: Largest background interquartile range, relative to the class-mean distance (auto).
BACKGROUND_SPREAD = 0.2
#: Bytes of source pixels per streamed band when block-averaging a thumbnail.
BAND_BYTES = 64 * 2**20


@dataclass
class TissueMask:
    """Tissue at thumbnail resolution.

    ``mask`` is bool; ``downsample`` is full-resolution pixels per mask pixel (may be
    non-integer). ``coverage`` optionally holds the exact tissue fraction of each mask
    pixel (when the mask was averaged down from a finer one); ``fractions`` prefers it.
    ``threshold`` and ``polarity`` record what detection chose, for the manifest.
    """

    mask: np.ndarray
    downsample: float
    coverage: np.ndarray | None = None
    threshold: float | None = None
    polarity: str | None = None
    _table: np.ndarray | None = field(default=None, init=False, repr=False)

    def fractions(self, ys: np.ndarray, xs: np.ndarray, size: float | np.ndarray) -> np.ndarray:
        """Tissue fraction of full-resolution squares with top-left (ys, xs) and side ``size``.

        Parts of a square outside the mask count as background.
        """
        ys = np.asarray(ys, np.float64)
        xs = np.asarray(xs, np.float64)
        size = np.asarray(size, np.float64)
        scale = 1.0 / self.downsample
        a0, b0 = ys * scale, xs * scale
        a1, b1 = (ys + size) * scale, (xs + size) * scale
        area = self._integral(a1, b1) - self._integral(a0, b1) - self._integral(a1, b0)
        area = area + self._integral(a0, b0)
        with np.errstate(divide="ignore", invalid="ignore"):
            fraction = area * self.downsample**2 / size**2
        return np.clip(np.nan_to_num(fraction), 0.0, 1.0)

    def _integral(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Tissue area in [0, a) x [0, b) (mask-pixel units): bilinear in the summed table."""
        table = self._summed_area_table()
        h, w = table.shape[0] - 1, table.shape[1] - 1
        a = np.clip(a, 0.0, h)
        b = np.clip(b, 0.0, w)
        i = np.minimum(a.astype(np.int64), h - 1)
        j = np.minimum(b.astype(np.int64), w - 1)
        fa, fb = a - i, b - j
        return (
            table[i, j] * (1 - fa) * (1 - fb)
            + table[i + 1, j] * fa * (1 - fb)
            + table[i, j + 1] * (1 - fa) * fb
            + table[i + 1, j + 1] * fa * fb
        )

    def _summed_area_table(self) -> np.ndarray:
        if self._table is None:
            values = self.coverage if self.coverage is not None else self.mask
            table = np.zeros((values.shape[0] + 1, values.shape[1] + 1), np.float64)
            np.cumsum(np.cumsum(values, axis=0, dtype=np.float64), axis=1, out=table[1:, 1:])
            self._table = table
        return self._table


def detect_tissue_from_thumbnail(
    thumb: np.ndarray,
    downsample: float,
    *,
    method: Method = "otsu",
    threshold: float | None = None,
    polarity: Polarity = "auto",
    min_object_px: float = 64.0,
    closing_radius: int = 2,
) -> TissueMask:
    """Tissue mask of a (h, w) or (h, w, C) thumbnail; see the module docstring.

    ``threshold`` (method 'threshold') is in normalised grey units, 0..1.
    ``min_object_px`` is a side length in full-resolution pixels.
    """
    grey = _normalised_grey(thumb)
    if method == "otsu":
        cut = _otsu(grey)
    elif method == "threshold":
        if threshold is None or not 0.0 <= threshold <= 1.0:
            raise UnshortcutError("tissue threshold: give a value between 0 and 1")
        cut = float(threshold)
    else:
        raise UnshortcutError(f"tissue method: unknown {method!r} (use otsu or threshold)")
    bright = grey > cut
    if polarity == "auto" and method == "threshold":
        polarity = "bright-background" if cut >= 0.5 else "dark-background"
    elif polarity == "auto":
        polarity = _background_side(bright)
        if not _flat_background(grey, bright, polarity):
            return TissueMask(np.ones(grey.shape, bool), float(downsample), None, cut, "none")
    elif polarity not in ("bright-background", "dark-background"):
        raise UnshortcutError(
            f"tissue polarity: unknown {polarity!r} (use auto, bright-background, dark-background)"
        )
    tissue = ~bright if polarity == "bright-background" else bright
    tissue = _clean(tissue, closing_radius, (min_object_px / downsample) ** 2)
    return TissueMask(tissue, float(downsample), None, cut, polarity)


def _normalised_grey(thumb: np.ndarray) -> np.ndarray:
    pixels = np.asarray(thumb, np.float32)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ValueError(f"thumbnail must be (h, w) or (h, w, C), got {thumb.shape}")
    pixels = np.nan_to_num(pixels)
    grey = np.zeros(pixels.shape[:2], np.float32)
    for channel in np.moveaxis(pixels, -1, 0):
        low, high = np.percentile(channel, [1, 99])
        if high > low:
            grey += np.clip((channel - low) / (high - low), 0.0, 1.0)
    return grey / pixels.shape[-1]


def _otsu(grey: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    if float(grey.max()) - float(grey.min()) < 1e-6:  # constant: everything on one side
        return float(grey.max())
    return float(threshold_otsu(grey))


def _flat_background(grey: np.ndarray, bright: np.ndarray, polarity: str) -> bool:
    """Whether the background side looks like glass or an empty field (module docstring)."""
    if bright.all() or not bright.any():
        return False
    above, below = grey[bright], grey[~bright]
    background = above if polarity == "bright-background" else below
    q1, q3 = np.percentile(background, [25, 75])
    return float(q3 - q1) <= BACKGROUND_SPREAD * float(above.mean() - below.mean())


def _background_side(bright: np.ndarray) -> Polarity:
    """Majority side of the border ring, else of the whole image (see module docstring)."""
    ring = max(1, min(bright.shape) // 50)
    border = np.concatenate(
        [
            bright[:ring].ravel(),
            bright[-ring:].ravel(),
            bright[:, :ring].ravel(),
            bright[:, -ring:].ravel(),
        ]
    )
    share = float(border.mean())
    if not 1 / 3 < share < 2 / 3:
        return "bright-background" if share >= 2 / 3 else "dark-background"
    return "bright-background" if float(bright.mean()) >= 0.5 else "dark-background"


def _clean(tissue: np.ndarray, closing_radius: int, min_area: float) -> np.ndarray:
    if closing_radius > 0:
        from skimage.morphology import disk

        # Pad with edge values so tissue that touches the border is not eroded there.
        padded = np.pad(tissue, closing_radius, mode="edge")
        closed = ndimage.binary_closing(padded, structure=disk(closing_radius))
        tissue = closed[closing_radius:-closing_radius, closing_radius:-closing_radius]
    if min_area > 1:
        tissue = _drop_small(tissue, min_area)
        tissue = ~_drop_small(~tissue, min_area)
    return tissue


def _drop_small(mask: np.ndarray, min_area: float) -> np.ndarray:
    """``mask`` without 8-connected components smaller than ``min_area`` pixels."""
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_area
    keep[0] = False
    return keep[labels]


def thumbnail_of(reader: ImageReader, max_side: int = 2048) -> tuple[np.ndarray, float]:
    """(float32 (h, w, C) thumbnail, full-resolution pixels per thumbnail pixel).

    Reads the finest pyramid level whose longer side is at most ``max_side``; otherwise
    block-averages the coarsest level by an integer factor, streaming full-width bands.
    """
    for level in range(reader.level_count):
        height, width = reader.level_shape(level)
        if max(height, width) <= max_side:
            pixels = reader.read_region(0, 0, height, width, level).astype(np.float32)
            return pixels, _level_downsample(reader, level)
    level = reader.level_count - 1
    height, width = reader.level_shape(level)
    factor = math.ceil(max(height, width) / max_side)
    row_bytes = width * reader.channels * np.dtype(reader.dtype).itemsize
    band = block_band_rows(factor, BAND_BYTES // max(row_bytes, 1))
    pixels = _block_mean(iter_bands(reader, band, level), factor)
    return pixels.astype(np.float32), _level_downsample(reader, level) * factor


def _level_downsample(reader: ImageReader, level: int) -> float:
    return 1.0 if level == 0 else float(reader.level_downsample(level))


def _block_mean(bands: Iterable[tuple[int, np.ndarray]], factor: int) -> np.ndarray:
    """Mean over ``factor`` x ``factor`` blocks (partial blocks at the edges averaged over
    their pixels) of an image given as full-width (h, w, C) bands whose heights are
    multiples of ``factor`` except the last."""
    rows = []
    for _, band in bands:
        height, width = band.shape[:2]
        starts_y, starts_x = np.arange(0, height, factor), np.arange(0, width, factor)
        sums = np.add.reduceat(band, starts_y, axis=0, dtype=np.float64)
        sums = np.add.reduceat(sums, starts_x, axis=1)
        count_y = np.minimum(factor, height - starts_y)
        count_x = np.minimum(factor, width - starts_x)
        rows.append(sums / (count_y[:, None, None] * count_x[None, :, None]))
    return np.concatenate(rows)


def tissue_from_mask_file(
    path: Path | str,
    shape: tuple[int, int],
    downsample: float,
    values: Collection[int] | None = None,
    allowed: Collection[int] = (),
) -> TissueMask:
    """A precomputed tissue mask (binarised like tumor masks) for an image of ``shape``.

    The file may be at full resolution or any lower one with the image's aspect ratio;
    it is averaged down by an integer factor towards ``downsample`` (full-resolution
    pixels per mask pixel), keeping the exact coverage of each averaged pixel.
    ``values``/``allowed`` read a label map (tissue = one of ``values``; see
    :class:`~unshortcut.io.masks.MaskReader`), so a tumor label map can serve as the
    tissue mask too.
    """
    with open_mask(path, values, allowed) as mask:
        mask_h, mask_w = mask.shape
        scale = shape[0] / mask_h
        if abs(shape[1] - mask_w * scale) > max(scale, 1.0):
            raise UnshortcutError(
                f"{path}: size {mask_w} x {mask_h} does not match image "
                f"{shape[1]} x {shape[0]} (width x height) at any scale"
            )
        factor = max(1, math.floor(downsample / scale + 1e-9))
        band = block_band_rows(factor, 2**24 // max(mask_w, 1))
        bands = ((y, b[..., None]) for y, b in mask.iter_bands(band))
        if factor == 1:
            full = np.concatenate([b[..., 0] for _, b in bands])
            return TissueMask(full, scale)
        coverage = _block_mean(bands, factor)[..., 0]
    return TissueMask(coverage >= 0.5, scale * factor, coverage=coverage)
