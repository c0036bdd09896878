"""Tumor (and tissue) masks as boolean arrays, whatever their file encoding.

Three encodings are known (contract 3.1 plus label maps):

* **0/1**: bool, or largest value <= 1; a pixel is foreground when its value is > 0.
* **0..255**: largest value > 127; foreground when > 127. The rule exists because JPEG
  masks carry compression noise (values 1..127 around edges and in flat areas), so
  ``== 255`` and ``> 0`` are both wrong there.
* **label map** with the values the user declared (``--tumor-values 2``, optionally
  ``--tissue-values 1,2``): foreground when the value is one of the chosen ones. Every
  value in the file must be 0 (always background) or declared, so a 0/255 or JPEG mask
  read as a label map, or a class the user forgot, is refused instead of silently
  counting as background.

A mask whose largest value is above 1 but at most 127 and for which no values were
declared is refused: read as a binary mask, a label map such as 0 glass / 1 tissue /
2 tumor gives no tumor at all. Errors name the file and the values found. (A label map
without its tumor class, 0 glass / 1 tissue only, looks exactly like a 0/1 mask and is
read as one: with label maps, always pass the values.)

Colour masks are reduced to one channel by the maximum over channels (a red or white
annotation counts), alpha is dropped by the image readers, and palette PNGs keep their
class indices. Label maps must have one channel.

The binary encoding is decided once per file from its largest value. To stay cheap on
large files we look at the smallest pyramid level; tiled TIFF levels are scanned exactly
with each distinct compressed tile decoded once (see
:meth:`~unshortcut.io.readers.TiffReader.reduce_tiles`); other sources are scanned whole
when they have at most ``FULL_SCAN_PIXELS`` pixels, else at ``SAMPLE_ROWS`` evenly
spaced rows. Failure mode of the last case: a 0..255 mask whose sampled rows contain
only 0 and 1 is read as 0/1, so stray 1-valued noise would count as tumor. Label maps
are scanned the same way at full resolution (a pyramid's averaged levels would invent
values).

Masks at a lower resolution than their image (a thumbnail-level export) are accepted
when the image is an integer multiple of the mask, each side within one mask pixel
(:func:`mask_scale`); :class:`ScaledMask` shows them at the image's resolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from unshortcut.blocks import accumulators, block_sum
from unshortcut.errors import UnshortcutError
from unshortcut.io.base import Closeable, ImageReader
from unshortcut.io.readers import block_band_rows, iter_bands, iter_block_sums, open_image

FULL_SCAN_PIXELS = 2**26
SAMPLE_ROWS = 256
#: Values an error message lists before it only counts the rest.
SHOWN_VALUES = 12

Foreground = Callable[[np.ndarray], np.ndarray]
"""(h, w, C) stored mask values -> bool (h, w) foreground."""


def binarise(values: np.ndarray, threshold: float) -> np.ndarray:
    """(h, w, C) mask values -> bool (h, w): max over channels above ``threshold``."""
    if values.shape[-1] == 1:  # the common case; a reduction over one channel costs 5x more
        return values[..., 0] > threshold
    if values.dtype == np.bool_:
        return values.any(axis=-1)
    return values.max(axis=-1) > threshold


def mask_threshold(reader: ImageReader) -> float:
    """0 for bool and 0/1 masks, 127 for 0..255 masks; refuses other value ranges."""
    if reader.dtype == np.bool_:
        return 0.0
    level = reader.level_count - 1
    peak = max((float(part.max(initial=0)) for part in _scan(reader, level, np.max)), default=0)
    if peak <= 1:
        return 0.0
    if peak > 127:
        return 127.0
    found = distinct_values(reader, level)
    raise UnshortcutError(
        f"{reader.path}: values {format_values(found)} fit no known mask encoding (0/1, or "
        "0/255 with JPEG noise); for a label map say which values are tumor, e.g. "
        "--tumor-values 2"
    )


def distinct_values(reader: ImageReader, level: int = 0) -> np.ndarray:
    """Sorted distinct values of ``level`` (sampled rows on large untiled sources)."""
    parts = _scan(reader, level, np.unique)
    return np.unique(np.concatenate([np.ravel(p) for p in parts])) if parts else np.empty(0)


def format_values(values: np.ndarray) -> str:
    """'0, 1, 2' for an error message; long lists are cut after ``SHOWN_VALUES``."""
    shown = ", ".join(f"{v:g}" for v in values[:SHOWN_VALUES].tolist())
    rest = len(values) - SHOWN_VALUES
    return shown if rest <= 0 else f"{shown}, ... ({len(values)} distinct)"


def _scan(
    reader: ImageReader, level: int, reduce: Callable[[np.ndarray], np.ndarray]
) -> list[np.ndarray]:
    """``reduce`` of the parts of ``level``: distinct tiles, bands, or sampled rows."""
    exact = getattr(reader, "reduce_tiles", None)
    parts = exact(level, reduce) if exact is not None else None
    if parts is not None:
        return parts
    height, width = reader.level_shape(level)
    if height * width <= FULL_SCAN_PIXELS:
        return [reduce(band) for _, band in iter_bands(reader, 1024, level)]
    rows = np.unique(np.linspace(0, height - 1, SAMPLE_ROWS).astype(int))
    return [reduce(reader.read_region(int(y), 0, 1, width, level)) for y in rows]


def value_foreground(reader: ImageReader, values: Collection[int]) -> Foreground:
    """Foreground test 'value is one of ``values``' for a one-channel integer label map."""
    dtype = np.dtype(reader.dtype)
    if reader.channels != 1 or dtype.kind not in "biu":
        raise UnshortcutError(
            f"{reader.path}: a label map must have one channel of integers "
            f"(has {reader.channels} of {dtype})"
        )
    wanted = np.array(sorted(values), np.int64)
    if dtype.kind == "u" and dtype.itemsize <= 2:  # a lookup table beats isin 10x
        table = np.zeros(int(np.iinfo(dtype).max) + 1, bool)
        table[wanted[wanted <= np.iinfo(dtype).max]] = True
        return lambda v: table[v[..., 0]]
    return lambda v: np.isin(v[..., 0], wanted)


def check_label_values(reader: ImageReader, declared: Collection[int]) -> None:
    """Refuse a label map holding a value that is neither 0 nor ``declared``."""
    found = distinct_values(reader, 0)
    unknown = np.setdiff1d(found, np.array(sorted({0, *declared})))
    if unknown.size:
        known = ", ".join(str(v) for v in sorted({0, *declared}))
        raise UnshortcutError(
            f"{reader.path}: values {format_values(found)} fit no known mask encoding: the "
            f"label map may only hold {known} (0 is background, the rest from "
            "--tumor-values/--tissue-values); declare every class it uses"
        )


class MaskReader(Closeable):
    """Boolean view of a mask file at its own full resolution (level 0).

    ``values`` selects label-map values as foreground (every value in the file must be 0,
    one of ``values`` or one of ``allowed``); without it the file must be a 0/1 or
    0..255 mask (module docstring).
    """

    def __init__(
        self,
        reader: ImageReader,
        values: Collection[int] | None = None,
        allowed: Collection[int] = (),
    ) -> None:
        self.reader = reader
        self.path: Path = reader.path
        self.threshold: float | None = None
        if values is None:
            threshold = self.threshold = mask_threshold(reader)
            self._foreground: Foreground = lambda v: binarise(v, threshold)
        else:
            self._foreground = value_foreground(reader, values)
            check_label_values(reader, {*values, *allowed})

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) at full resolution."""
        return self.reader.level_shape(0)

    def read_region(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        """bool (height, width); raises UnshortcutError when the rectangle leaves the mask."""
        return self._foreground(self.reader.read_region(y, x, height, width))

    def iter_bands(self, band_height: int) -> Iterator[tuple[int, np.ndarray]]:
        """Full-width bool bands ``(y, band)``; tiled files decode each tile once."""
        for y, band in iter_bands(self.reader, band_height):
            yield y, self._foreground(band)

    def iter_block_sums(
        self, factor: int, rows: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Foreground pixels per ``factor`` x ``factor`` block, as ``(block_row, counts)``,
        for the first ``rows`` block rows (default: all).

        Tiles are binarised and counted in the decode threads (see
        :func:`~unshortcut.io.readers.iter_block_sums`).
        """
        yield from iter_block_sums(self.reader, factor, 0, self._foreground, rows)

    def close(self) -> None:
        self.reader.close()


def open_mask(
    path: Path | str, values: Collection[int] | None = None, allowed: Collection[int] = ()
) -> MaskReader:
    """Open a tumor or tissue mask; any image format :func:`open_image` reads.

    ``values``/``allowed``: read it as a label map (see :class:`MaskReader`).
    """
    reader = open_image(path, palette_indices=True)
    try:
        return MaskReader(reader, values, allowed)
    except BaseException:
        reader.close()
        raise


def mask_scale(image_shape: tuple[int, int], mask_shape: tuple[int, int]) -> int | None:
    """Integer k such that the mask is the image shrunk k times, else None.

    Each mask side must be the image side divided by k, rounded either way (within one
    mask pixel), so the aspect ratio matches; k = 1 means the same size.
    """
    (height, width), (mask_h, mask_w) = image_shape, mask_shape
    if min(height, width, mask_h, mask_w) < 1:
        return None
    for k in sorted({max(1, round(height / mask_h)), max(1, round(width / mask_w))}):
        if abs(mask_h * k - height) < k and abs(mask_w * k - width) < k:
            return k
    return None


class SourceMask(Protocol):
    """What :class:`ScaledMask` needs from the mask it scales."""

    path: Path

    @property
    def shape(self) -> tuple[int, int]: ...

    def read_region(self, y: int, x: int, height: int, width: int) -> np.ndarray: ...

    def close(self) -> None: ...


class ScaledMask(Closeable):
    """A mask stored at 1/``scale`` of its image, seen at the image's resolution (nearest).

    Image pixel (y, x) takes the value of mask pixel (y // scale, x // scale), clamped to
    the last mask row or column where the image is a little larger than ``scale`` times
    the mask. Block sums are counted at the coarsest resolution the block side and the
    scale share (their gcd) and multiplied up, so a whole-slide mask is never expanded
    to full resolution unless the two are coprime (then in bands, as any mask).
    """

    def __init__(self, mask: SourceMask, scale: int, shape: tuple[int, int]) -> None:
        self.mask = mask
        self.path = mask.path
        self.scale = scale
        self._shape = shape

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the image the mask belongs to."""
        return self._shape

    def read_region(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        """bool (height, width) at the image's resolution."""
        full_h, full_w = self._shape
        if min(y, x, height, width) < 0 or y + height > full_h or x + width > full_w:
            raise UnshortcutError(
                f"{self.path}: region y={y} x={x} height={height} width={width} leaves the "
                f"image ({full_h} x {full_w})"
            )
        return self._nearest(y, x, height, width, 1)

    def _nearest(self, top: int, left: int, height: int, width: int, step: int) -> np.ndarray:
        """bool (height, width) at ``step`` image pixels per pixel (``step`` divides scale)."""
        mask_h, mask_w = self.mask.shape
        rows = np.minimum(np.arange(top, top + height) * step // self.scale, mask_h - 1)
        cols = np.minimum(np.arange(left, left + width) * step // self.scale, mask_w - 1)
        if not (rows.size and cols.size):
            return np.zeros((height, width), bool)
        r0, c0 = int(rows[0]), int(cols[0])
        stored = self.mask.read_region(r0, c0, int(rows[-1]) - r0 + 1, int(cols[-1]) - c0 + 1)
        return stored[np.ix_(rows - r0, cols - c0)]

    def iter_bands(self, band_height: int) -> Iterator[tuple[int, np.ndarray]]:
        """Full-width bool bands ``(y, band)`` at the image's resolution."""
        height, width = self._shape
        for y in range(0, height, band_height):
            yield y, self._nearest(y, 0, min(band_height, height - y), width, 1)

    def iter_block_sums(
        self, factor: int, rows: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Foreground image pixels per ``factor`` x ``factor`` block (see MaskReader)."""
        height, width = self._shape
        limit = height // factor if rows is None else min(rows, height // factor)
        step = math.gcd(factor, self.scale)
        inner, weight = factor // step, step * step
        out_dtype = np.dtype(accumulators(np.dtype(bool), factor)[1])
        chunk = block_band_rows(factor) // factor
        cols = width // factor * inner
        for top in range(0, limit, chunk):
            count = min(chunk, limit - top)
            coarse = self._nearest(top * inner, 0, count * inner, cols, step)
            yield top, block_sum(coarse, inner).astype(out_dtype) * out_dtype.type(weight)

    def close(self) -> None:
        self.mask.close()
