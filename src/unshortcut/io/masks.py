"""Tumor (and tissue) masks as boolean arrays, whatever their file encoding.

Contract 3.1: a pixel is foreground when its value is > 0 in a 0/1 mask and > 127 in a
0..255 mask. The second rule exists because JPEG masks carry compression noise
(values 1..127 around edges and in flat areas), so ``== 255`` and ``> 0`` are both wrong
there. Colour masks are reduced to one channel by the maximum over channels (a red or
white annotation counts), alpha is dropped by the image readers, and palette PNGs keep
their class indices.

The encoding is decided once per file from its largest value: bool or max <= 1 means a
0/1 mask. To stay cheap on large files we look at the smallest pyramid level; tiled
TIFF levels are scanned exactly with each distinct compressed tile decoded once (see
:meth:`~unshortcut.io.readers.TiffReader.peak_value`); other sources are scanned whole
when they have at most ``FULL_SCAN_PIXELS`` pixels, else at ``SAMPLE_ROWS`` evenly
spaced rows. Failure mode of the last case: a 0..255 mask whose sampled rows contain
only 0 and 1 is read as 0/1, so stray 1-valued noise would count as tumor.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np

from unshortcut.io.base import ImageReader
from unshortcut.io.readers import iter_bands, iter_block_sums, open_image

FULL_SCAN_PIXELS = 2**26
SAMPLE_ROWS = 256


def binarise(values: np.ndarray, threshold: float) -> np.ndarray:
    """(h, w, C) mask values -> bool (h, w): max over channels above ``threshold``."""
    if values.shape[-1] == 1:  # the common case; a reduction over one channel costs 5x more
        return values[..., 0] > threshold
    if values.dtype == np.bool_:
        return values.any(axis=-1)
    return values.max(axis=-1) > threshold


def mask_threshold(reader: ImageReader) -> float:
    """0 for bool and 0/1 masks, 127 for 0..255 masks (see the module docstring)."""
    if reader.dtype == np.bool_:
        return 0.0
    return 0.0 if _peak(reader, reader.level_count - 1) <= 1 else 127.0


def _peak(reader: ImageReader, level: int) -> float:
    """Largest value of ``level``: exact, or sampled rows on large untiled sources."""
    exact = getattr(reader, "peak_value", None)
    peak = exact(level) if exact is not None else None
    if peak is not None:
        return float(peak)
    height, width = reader.level_shape(level)
    if height * width <= FULL_SCAN_PIXELS:
        bands = iter_bands(reader, 1024, level)
        return max((float(band.max(initial=0)) for _, band in bands), default=0.0)
    rows = np.unique(np.linspace(0, height - 1, SAMPLE_ROWS).astype(int))
    return max(float(reader.read_region(int(y), 0, 1, width, level).max()) for y in rows)


class MaskReader:
    """Boolean view of a mask file at full resolution (level 0)."""

    def __init__(self, reader: ImageReader) -> None:
        self.reader = reader
        self.path: Path = reader.path
        self.threshold = mask_threshold(reader)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) at full resolution."""
        return self.reader.level_shape(0)

    def read_region(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        """bool (height, width); raises UnshortcutError when the rectangle leaves the mask."""
        return binarise(self.reader.read_region(y, x, height, width), self.threshold)

    def iter_bands(self, band_height: int) -> Iterator[tuple[int, np.ndarray]]:
        """Full-width bool bands ``(y, band)``; tiled files decode each tile once."""
        for y, band in iter_bands(self.reader, band_height):
            yield y, binarise(band, self.threshold)

    def iter_block_sums(
        self, factor: int, rows: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Foreground pixels per ``factor`` x ``factor`` block, as ``(block_row, counts)``,
        for the first ``rows`` block rows (default: all).

        Tiles are binarised and counted in the decode threads (see
        :func:`~unshortcut.io.readers.iter_block_sums`).
        """
        threshold = self.threshold
        counts = iter_block_sums(self.reader, factor, 0, lambda v: binarise(v, threshold), rows)
        yield from counts

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_mask(path: Path | str) -> MaskReader:
    """Open a tumor or tissue mask; any image format :func:`open_image` reads."""
    reader = open_image(path, palette_indices=True)
    try:
        return MaskReader(reader)
    except BaseException:
        reader.close()
        raise
