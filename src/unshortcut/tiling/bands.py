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

import queue
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol, TypeVar

import numpy as np

from unshortcut.io.base import ImageReader
from unshortcut.io.readers import iter_bands
from unshortcut.tiling.grid import (
    Grid,
    area_resize,
    block_sum,
    crops,
    mean_from_sums,
    pool_factor,
    thumbnail_factor,
    to_dtype,
    tumor_mask_uint8,
    windows,
)

T = TypeVar("T")

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


def _prefetch(items: Iterator[T], depth: int = 2) -> Generator[T, None, None]:
    """Produce ``items`` in a background thread, up to ``depth`` ahead of the consumer.

    Decoding (image tiles, mask tiles) then overlaps with pooling: the codecs and numpy
    release the GIL, so this is real parallelism. An exception in the producer is raised
    in the consumer; closing the consumer stops the producer.
    """
    buffer: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, end))
        except BaseException as error:
            put((False, error))

    thread = threading.Thread(target=produce, name="unshortcut-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = buffer.get()
            if not ok:
                raise item
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _until(bands: Iterator[tuple[int, np.ndarray]], rows: int) -> Iterator[np.ndarray]:
    """The bands of a (y, band) stream until row ``rows`` is covered; nothing decoded past."""
    for y, band in bands:
        yield band
        if y + len(band) >= rows:
            return


def _mask_chunks(mask: MaskSource, rows: int) -> Iterator[np.ndarray]:
    """Full-width boolean mask rows [0, ``rows``) top to bottom, in the reader's bands."""
    own = getattr(mask, "iter_bands", None)
    if own is not None:
        yield from _until(own(_MASK_CHUNK_ROWS), rows)
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
    covered = grid.covered_height
    image_chunks = _prefetch(_until(iter_bands(reader, min(size, stride), level), covered))
    mask_chunks = _prefetch(_mask_chunks(mask, covered * downsample))
    with closing(image_chunks), closing(mask_chunks):
        return _tile_bands(
            reader.dtype,
            _RollingRows(image_chunks, width),
            _RollingRows(mask_chunks, width * downsample),
            grid,
            downsample,
            input_size,
            pixel_out,
            mask_out,
            want_thumbnail,
            on_band,
        )


def _mask_sums(mask_band: np.ndarray, factor: int) -> np.ndarray:
    """Tumor pixels per block; most bands of a slide hold no tumor and cost one scan."""
    if mask_band.any():
        return block_sum(mask_band, factor)
    height, width = mask_band.shape
    return np.zeros((height // factor, width // factor), np.uint32)


def _tile_bands(
    dtype: np.dtype,
    image_rows: _RollingRows,
    mask_rows: _RollingRows,
    grid: Grid,
    downsample: int,
    input_size: int,
    pixel_out: BinaryIO,
    mask_out: BinaryIO,
    want_thumbnail: bool,
    on_band: Callable[[], None],
) -> TiledImage:
    """The band loop of :func:`tile_image`, over already opened row streams."""
    size, stride = grid.size, grid.stride
    factor = pool_factor(size, stride, input_size)
    thumb_factor = thumbnail_factor(size, stride, grid.height, grid.width)
    reuse_pooled = factor is not None and stride == size and thumb_factor % factor == 0
    full = size * downsample
    tumor = np.empty((grid.rows, grid.cols), dtype=np.float64)
    thumb_parts: list[np.ndarray] = []
    for row, y in enumerate(grid.ys.tolist()):
        band, fresh = image_rows.band(y, y + size)
        mask_band, _ = mask_rows.band(y * downsample, (y + size) * downsample)
        if factor is not None:
            step, mask_factor = stride // factor, factor * downsample
            sums = block_sum(band, factor)
            pooled = mean_from_sums(sums, factor**2, dtype)
            patches = windows(pooled, input_size, step)
            counts = windows(_mask_sums(mask_band, mask_factor), input_size, step)
            tumor_counts = counts.sum(axis=(1, 2))
            scaled = counts.astype(np.uint32) * 255
            mask_patches = mean_from_sums(scaled, mask_factor**2, np.dtype(np.uint8))
        else:
            patches = to_dtype(area_resize(crops(band, grid.xs, size), input_size), dtype)
            mask_crops = crops(mask_band[:, :, None], grid.xs * downsample, full)
            tumor_counts = mask_crops.sum(axis=(1, 2, 3))
            mask_patches = tumor_mask_uint8(area_resize(mask_crops, input_size)[:, 0])
        pixel_out.write(np.ascontiguousarray(patches).tobytes())
        mask_out.write(np.ascontiguousarray(mask_patches).tobytes())
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
        thumbnail = to_dtype(np.concatenate(thumb_parts), dtype)
    return TiledImage(tumor.reshape(-1), thumbnail, thumb_factor * downsample)
