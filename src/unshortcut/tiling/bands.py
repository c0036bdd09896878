"""One decode pass over an image: stream it top to bottom, cut and resize every patch.

Whole-slide images are decoded tile by tile; reading each patch on its own decodes
shared tiles again and again and reopens the file. Here the image is read once, top to
bottom, and every decoded pixel is reduced once.

When the patch side is a multiple of the input size (the usual case), patches are block
means: the reader block-sums each tile right after decoding it, in the decode threads,
and this module only sees the sums (16x fewer values at a 4x reduction on a large
slide). Patches, their masks (tumor pixels counted per block the same way) and the
tissue thumbnail (sums of the sums) are all cut from those streams. Other sizes stream
full-resolution bands one patch row high and resize each patch with adaptive area
pooling.

Resized patches go to temporary files in grid order; only after tissue detection is it
known which patches are kept, and the caller compacts those into the final store.
Memory stays at a few bands, whatever the image size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import numpy as np

from unshortcut.blocks import block_sum
from unshortcut.io.base import ImageReader
from unshortcut.io.readers import (
    block_band_rows,
    block_sums_of_bands,
    iter_bands,
    iter_block_sums,
)
from unshortcut.prefetch import prefetched
from unshortcut.tiling.grid import (
    Grid,
    area_resize,
    crops,
    mean_from_sums,
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


def _until(bands: Iterator[tuple[int, np.ndarray]], rows: int) -> Iterator[np.ndarray]:
    """The bands of a (y, band) stream until row ``rows`` is covered; nothing decoded past."""
    for y, band in bands:
        yield band
        if y + len(band) >= rows:
            return


def _mask_chunks(mask: MaskSource) -> Iterator[tuple[int, np.ndarray]]:
    """Full-width boolean mask rows top to bottom, in the reader's bands."""
    own = getattr(mask, "iter_bands", None)
    if own is not None:
        yield from own(_MASK_CHUNK_ROWS)
        return
    height, width = mask.shape
    for y in range(0, height, _MASK_CHUNK_ROWS):
        yield y, mask.read_region(y, 0, min(_MASK_CHUNK_ROWS, height - y), width)


def _mask_block_sums(mask: MaskSource, factor: int, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """Tumor pixels per ``factor`` x ``factor`` block of the first ``rows`` block rows."""
    own = getattr(mask, "iter_block_sums", None)
    if own is not None:
        yield from own(factor, rows)
        return
    step = block_band_rows(factor, _MASK_CHUNK_ROWS)
    width, end = mask.shape[1], rows * factor
    bands = ((y, mask.read_region(y, 0, min(step, end - y), width)) for y in range(0, end, step))
    yield from block_sums_of_bands(bands, factor, None, rows)


@dataclass
class _PatchRow:
    """One grid row, ready to write: patches, their masks, tumor pixel counts, and the
    thumbnail block sums of the image rows no earlier grid row covered (None when no
    thumbnail is wanted)."""

    patches: np.ndarray
    mask_patches: np.ndarray
    tumor_counts: np.ndarray
    thumbnail_sums: np.ndarray | None


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
    thumb_factor = thumbnail_factor(grid.size, grid.stride, grid.height, grid.width)
    factor = pool_factor(grid.size, grid.stride, input_size)
    cut = _pooled_rows if factor is not None else _resized_rows
    rows = cut(reader, mask, grid, level, downsample, input_size, thumb_factor, want_thumbnail)
    full = grid.size * downsample
    tumor = np.empty((grid.rows, grid.cols), dtype=np.float64)
    thumb_parts: list[np.ndarray] = []
    with closing(rows):
        for row, patch_row in enumerate(rows):
            pixel_out.write(np.ascontiguousarray(patch_row.patches).tobytes())
            mask_out.write(np.ascontiguousarray(patch_row.mask_patches).tobytes())
            tumor[row] = patch_row.tumor_counts / full**2
            if patch_row.thumbnail_sums is not None:
                thumb_parts.append(patch_row.thumbnail_sums)
            on_band()
    thumbnail = None
    if want_thumbnail:
        thumbnail = mean_from_sums(np.concatenate(thumb_parts), thumb_factor**2, reader.dtype)
    return TiledImage(tumor.reshape(-1), thumbnail, thumb_factor * downsample)


def _pooled_rows(
    reader: ImageReader,
    mask: MaskSource,
    grid: Grid,
    level: int,
    downsample: int,
    input_size: int,
    thumb_factor: int,
    want_thumbnail: bool,
) -> Generator[_PatchRow, None, None]:
    """Grid rows from block-sum streams of the image (at ``level``) and the mask.

    The image is streamed as sums over ``base`` x ``base`` blocks, the largest block both
    the pooling factor and the thumbnail factor are made of (the pooling factor itself
    on large images); patches and thumbnail are sums of those sums, so both stay exact.
    Every band boundary falls on a block boundary (the pooling factor divides patch
    size and stride), so a grid row is a slice of block rows of each stream.
    """
    factor = pool_factor(grid.size, grid.stride, input_size)
    assert factor is not None
    base = math.gcd(factor, thumb_factor) if want_thumbnail else factor
    mask_factor = factor * downsample
    image_sums = prefetched(
        chunk
        for _, chunk in iter_block_sums(reader, base, level, None, grid.covered_height // base)
    )
    mask_rows = grid.covered_height // factor
    mask_sums = prefetched(chunk for _, chunk in _mask_block_sums(mask, mask_factor, mask_rows))
    with closing(image_sums), closing(mask_sums):
        image_stream = _RollingRows(image_sums, grid.covered_width // base)
        mask_stream = _RollingRows(mask_sums, grid.covered_width // factor)
        step = grid.stride // factor
        for y in grid.ys.tolist():
            base_sums, fresh = image_stream.band(y // base, (y + grid.size) // base)
            counts, _ = mask_stream.band(y // factor, (y + grid.size) // factor)
            sums = _coarser(base_sums, factor // base)
            thumbnail = None
            if want_thumbnail and len(fresh):
                thumbnail = _coarser(fresh, thumb_factor // base)
            pooled = mean_from_sums(sums, factor**2, reader.dtype)
            patches = windows(pooled, input_size, step)
            if counts.any():
                count_windows = windows(counts, input_size, step)
                scaled = count_windows.astype(np.uint32) * 255
                mask_patches = mean_from_sums(scaled, mask_factor**2, np.dtype(np.uint8))
                tumor_counts = count_windows.sum(axis=(1, 2))
            else:  # most rows of a slide hold no tumor
                mask_patches = np.zeros((grid.cols, input_size, input_size), np.uint8)
                tumor_counts = np.zeros(grid.cols, np.int64)
            yield _PatchRow(patches, mask_patches, tumor_counts, thumbnail)


def _coarser(sums: np.ndarray, factor: int) -> np.ndarray:
    """Sums over ``factor`` x ``factor`` blocks of block sums (exact: sums of sums)."""
    return sums if factor == 1 else block_sum(sums, factor)


def _resized_rows(
    reader: ImageReader,
    mask: MaskSource,
    grid: Grid,
    level: int,
    downsample: int,
    input_size: int,
    thumb_factor: int,
    want_thumbnail: bool,
) -> Generator[_PatchRow, None, None]:
    """Grid rows from full-resolution bands, each patch area-resized on its own."""
    size, full = grid.size, grid.size * downsample
    bands = iter_bands(reader, min(size, grid.stride), level)
    image_chunks = prefetched(_until(bands, grid.covered_height))
    mask_chunks = prefetched(_until(_mask_chunks(mask), grid.covered_height * downsample))
    with closing(image_chunks), closing(mask_chunks):
        image_rows = _RollingRows(image_chunks, grid.covered_width)
        mask_rows = _RollingRows(mask_chunks, grid.covered_width * downsample)
        for y in grid.ys.tolist():
            band, fresh = image_rows.band(y, y + size)
            mask_band, _ = mask_rows.band(y * downsample, (y + size) * downsample)
            mask_crops = crops(mask_band[:, :, None], grid.xs * downsample, full)
            thumbnail = None
            if want_thumbnail and len(fresh):
                thumbnail = block_sum(fresh, thumb_factor)
            yield _PatchRow(
                patches=to_dtype(area_resize(crops(band, grid.xs, size), input_size), reader.dtype),
                mask_patches=tumor_mask_uint8(area_resize(mask_crops, input_size)[:, 0]),
                tumor_counts=mask_crops.sum(axis=(1, 2, 3)),
                thumbnail_sums=thumbnail,
            )
