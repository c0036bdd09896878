"""One decode pass over an image: stream full-width bands, cut and resize every patch.

Whole-slide images are decoded tile by tile; reading each patch on its own decodes
shared tiles again and again and reopens the file. Here the image is read once, top to
bottom, in bands one patch row high (plus the stride overlap kept from the previous
band). Each band is area-pooled to the input size once, and the grid patches are
cut from the pooled band, which is far cheaper than pooling patch by patch. The tumor
mask is read in the same bands, and a block-mean thumbnail for tissue detection is
accumulated from the same decoded pixels, so no pixel is decoded twice.

Resized patches go to temporary files in grid order; only after tissue detection is it
known which patches are kept, and the caller compacts those into the final store.
Memory stays at a few bands, whatever the image size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import numpy as np

from unshortcut.io.base import ImageReader
from unshortcut.io.readers import iter_bands
from unshortcut.tiling.grid import (
    Grid,
    area_resize,
    block_sum,
    crops,
    pool_factor,
    thumbnail_factor,
    to_dtype,
    tumor_mask_uint8,
    windows,
)

#: Mask rows read per chunk when the mask reader has no band iterator of its own.
_MASK_CHUNK_ROWS = 256


class MaskSource(Protocol):
    """What tiling needs from a mask reader: boolean full-resolution rectangles."""

    @property
    def shape(self) -> tuple[int, int]: ...

    def read_region(self, y: int, x: int, height: int, width: int) -> np.ndarray: ...


@dataclass
class TiledImage:
    """Per-grid-position results of one pass, in row-major grid order."""

    tumor_fraction: np.ndarray
    thumbnail: np.ndarray | None
    thumbnail_downsample: int


class _RollingRows:
    """A window of full-width rows over a top-to-bottom stream of row chunks.

    Rows are pulled from ``chunks`` (each row decoded once) only as far as the next
    band needs; rows below the current band are kept for the next, overlapping band.
    """

    def __init__(self, chunks: Iterator[np.ndarray], width: int) -> None:
        self._chunks = chunks
        self._width = width
        self._rows = np.empty((0, 0))
        self._start = 0
        self._fresh_from = 0

    def band(self, top: int, bottom: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [top, bottom) and the rows that no earlier call returned as new.

        The new rows start where the previous band ended, so they include the gap rows
        skipped when the stride exceeds the patch size: together they tile the image.
        """
        keep_from = min(top, self._fresh_from) - self._start
        parts = [self._rows[keep_from:]] if keep_from < len(self._rows) else []
        start = self._start + keep_from
        end = start + sum(len(p) for p in parts)
        while end < bottom:
            chunk = next(self._chunks)[:, : self._width]
            parts.append(chunk)
            end += len(chunk)
        self._rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self._start = start
        fresh = self._rows[self._fresh_from - start : bottom - start]
        self._fresh_from = bottom
        return self._rows[top - start : bottom - start], fresh


def _mask_chunks(mask: MaskSource, rows: int) -> Iterator[np.ndarray]:
    """Full-width boolean mask rows, top to bottom, in the mask reader's natural bands."""
    own = getattr(mask, "iter_bands", None)
    if own is not None:
        for _, band in own(_MASK_CHUNK_ROWS):
            yield band
        return
    width = mask.shape[1]
    for y in range(0, rows, _MASK_CHUNK_ROWS):
        yield mask.read_region(y, 0, min(_MASK_CHUNK_ROWS, mask.shape[0] - y), width)


def tile_image(
    reader: ImageReader,
    mask: MaskSource,
    grid: Grid,
    level: int,
    downsample: int,
    input_size: int,
    pixel_out: BinaryIO,
    mask_out: BinaryIO,
    want_thumbnail: bool,
    on_band: Callable[[], None] = lambda: None,
) -> TiledImage:
    """Cut, resize and write every grid patch of ``reader`` (at ``level``) in one pass.

    ``downsample`` is the integer full-resolution pixels per level pixel; the mask is
    read at full resolution, so tumor fractions are exact full-resolution fractions.
    Pixels go to ``pixel_out`` as (C, S, S) rows in the source dtype, masks to
    ``mask_out`` as (S, S) uint8 rows. Returns tumor fractions and, when asked, the
    block-mean thumbnail (h, w, C) in the source dtype.
    """
    size, stride, width = grid.size, grid.stride, grid.covered_width
    factor = pool_factor(size, stride, input_size)
    thumb_factor = thumbnail_factor(size, stride, grid.height, grid.width)
    reuse_pooled = factor is not None and stride == size and thumb_factor % factor == 0
    full = size * downsample
    image_chunks = (band for _, band in iter_bands(reader, min(size, stride), level))
    image_rows = _RollingRows(image_chunks, width)
    mask_chunks = _mask_chunks(mask, grid.covered_height * downsample)
    mask_rows = _RollingRows(mask_chunks, width * downsample)
    tumor = np.empty((grid.rows, grid.cols), dtype=np.float64)
    thumb_parts: list[np.ndarray] = []
    for row, y in enumerate(grid.ys.tolist()):
        band, fresh = image_rows.band(y, y + size)
        mask_band, _ = mask_rows.band(y * downsample, (y + size) * downsample)
        if factor is not None:
            sums = block_sum(band, factor)
            patches = windows(sums, input_size, stride // factor) / factor**2
            mask_factor = factor * downsample
            counts = windows(
                block_sum(mask_band[:, :, None], mask_factor), input_size, stride // factor
            )
            tumor_counts = counts.sum(axis=(1, 2, 3))
            mask_patches = counts[:, 0] / mask_factor**2
        else:
            patches = area_resize(crops(band, grid.xs, size), input_size)
            mask_crops = crops(mask_band[:, :, None], grid.xs * downsample, full)
            tumor_counts = mask_crops.sum(axis=(1, 2, 3))
            mask_patches = area_resize(mask_crops, input_size)[:, 0]
        pixel_out.write(to_dtype(patches, reader.dtype).tobytes())
        mask_out.write(tumor_mask_uint8(mask_patches).tobytes())
        tumor[row] = tumor_counts / full**2
        if want_thumbnail and len(fresh):
            if reuse_pooled:
                part = block_sum(sums, thumb_factor // factor)  # sums of sums: exact
            else:
                part = block_sum(fresh, thumb_factor)
            thumb_parts.append(part / thumb_factor**2)
        on_band()
    thumbnail = None
    if want_thumbnail:
        thumbnail = to_dtype(np.concatenate(thumb_parts), reader.dtype)
    return TiledImage(tumor.reshape(-1), thumbnail, thumb_factor * downsample)
