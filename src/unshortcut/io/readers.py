"""Open any supported image as an :class:`~unshortcut.io.base.ImageReader`.

Three reader families cover every format of contract 3.1:

* :class:`ArrayReader` for data that is either small (PNG/JPEG, decoded whole once, on
  first read) or memory-mapped (NPY, uncompressed contiguous TIFF), so a region is a slice.
* :class:`TiffReader` for compressed, tiled, stripped and pyramidal TIFF/OME-TIFF. It
  decodes only the tiles a region touches, with tifffile's own codecs
  (``TiffPage.decode``), in a thread pool: imagecodecs releases the GIL, so the tiles of
  one band decode in parallel. We do not go through ``aszarr()``: the installed tifffile
  only serves zarr 3 stores, the project pins zarr 2, and zarr reads chunks one after the
  other anyway. :meth:`TiffReader.iter_bands` decodes every tile exactly once over a pass.
* :class:`OpenSlideReader` for whole-slide formats (.svs, .ndpi, .mrxs, ...).

Format detection: the extension must be one we support, and the file's first bytes
decide the decoder (a JPEG saved as ``.png`` is read as JPEG; a text file saved as
``.tif`` is an error). Every library exception while opening or decoding is turned into
an :class:`UnshortcutError` that names the file.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from unshortcut.blocks import accumulators, block_sum
from unshortcut.errors import UnshortcutError
from unshortcut.io.base import Closeable, ImageReader

PILLOW_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg"})
TIFF_EXTENSIONS = frozenset({".tif", ".tiff"})
NPY_EXTENSIONS = frozenset({".npy"})
WSI_EXTENSIONS = frozenset({".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"})
SUPPORTED_EXTENSIONS = PILLOW_EXTENSIONS | TIFF_EXTENSIONS | NPY_EXTENSIONS | WSI_EXTENSIONS

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),
    (b"MM\x00+", "tiff"),
    (b"\x93NUMPY", "npy"),
)

#: Decoded tiles kept per TIFF reader for random access (patch reads, thumbnails).
TILE_CACHE_BYTES = 64 * 2**20
#: Channel-first is assumed when the first of three axes is at most this long.
MAX_CHANNEL_FIRST = 16


def image_extension(path: Path) -> str:
    """Lower-case extension of ``path``; ``.ome.tif`` counts as ``.tif``."""
    return Path(path).suffix.lower()


def image_stem(path: Path) -> str:
    """File name without its image extension (``a.ome.tiff`` -> ``a``)."""
    name = Path(path).name
    stem = name[: len(name) - len(Path(name).suffix)]
    return stem[:-4] if stem.lower().endswith(".ome") else stem


def open_image(path: Path | str, *, palette_indices: bool = False) -> ImageReader:
    """Open ``path`` lazily; pixels are decoded only when a region is read.

    ``palette_indices`` keeps palette PNGs as their class indices instead of RGB colours,
    which is what a mask means by them.
    """
    path = Path(path)
    ext = image_extension(path)
    if ext not in SUPPORTED_EXTENSIONS:
        known = ", ".join(sorted(SUPPORTED_EXTENSIONS))
        raise UnshortcutError(f"{path}: unknown image format '{ext}' (supported: {known})")
    if not path.is_file():
        raise UnshortcutError(f"{path}: no such file")
    if ext in WSI_EXTENSIONS:
        return OpenSlideReader(path)
    kind = _sniff(path)
    if kind is None:
        raise UnshortcutError(f"{path}: not a valid {ext[1:].upper()} image (unrecognised content)")
    if kind == "tiff":
        return TiffReader(path)
    if kind == "npy":
        return _npy_reader(path)
    return _pillow_reader(path, palette_indices)


def iter_bands(
    reader: ImageReader, band_height: int, level: int = 0
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(y, band)`` full-width bands of ``band_height`` rows (the last may be shorter).

    Uses the reader's own ``iter_bands`` when it has one (TIFF: every tile decoded once).
    """
    if band_height < 1:
        raise ValueError("band_height must be positive")
    own = getattr(reader, "iter_bands", None)
    if own is not None:
        yield from own(band_height, level)
        return
    height, width = reader.level_shape(level)
    for y in range(0, height, band_height):
        yield y, reader.read_region(y, 0, min(band_height, height - y), width, level)


#: Rows per band when block sums are taken from full-width bands (non-tiled sources).
BLOCK_SUM_BAND_ROWS = 256


def block_band_rows(factor: int, rows: int = BLOCK_SUM_BAND_ROWS) -> int:
    """About ``rows`` rows, rounded to a whole number (at least one) of ``factor`` blocks."""
    return max(1, rows // factor) * factor


TileReduce = Callable[[np.ndarray], np.ndarray]
"""Maps decoded (h, w, C) pixels to the one (h, w) value map to block-sum (a binarised
mask, say)."""


def iter_block_sums(
    reader: ImageReader,
    factor: int,
    level: int = 0,
    prepare: TileReduce | None = None,
    rows: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(block_row, sums)``: exact ``factor`` x ``factor`` block sums, top to bottom.

    Together the chunks cover the first ``rows`` (default: all ``height // factor``)
    block rows and ``width // factor`` block columns; partial blocks at the right and
    bottom edges are left out, and nothing below ``rows`` is read. Sums are
    (rows, cols, C), or (rows, cols) when ``prepare`` maps the pixels to one value map
    first. TIFF readers sum each tile in the decode threads while it is still in cache;
    other readers sum full-width bands.
    """
    if factor < 1:
        raise ValueError("factor must be positive")
    own = getattr(reader, "iter_block_sums", None)
    if own is not None:
        yield from own(factor, level, prepare, rows)
        return
    height, width = reader.level_shape(level)
    limit = _block_limit(height, factor, rows)
    step = block_band_rows(factor)
    bands = (
        (y, reader.read_region(y, 0, min(step, limit * factor - y), width, level))
        for y in range(0, limit * factor, step)
    )
    yield from block_sums_of_bands(bands, factor, prepare, limit)


def _block_limit(height: int, factor: int, rows: int | None) -> int:
    return height // factor if rows is None else min(rows, height // factor)


def block_sums_of_bands(
    bands: Iterator[tuple[int, np.ndarray]],
    factor: int,
    prepare: TileReduce | None,
    rows: int,
) -> Iterator[tuple[int, np.ndarray]]:
    """Block sums of the first ``rows`` block rows of full-width bands (heights multiples
    of ``factor``, but the last)."""
    for y, band in bands:
        top = y // factor
        whole = min(len(band) // factor, rows - top) * factor
        if whole <= 0:
            return
        values = band[:whole, : band.shape[1] // factor * factor]
        yield top, block_sum(prepare(values) if prepare else values, factor)
        if top + whole // factor >= rows:
            return


def _sniff(path: Path) -> str | None:
    with path.open("rb") as fh:
        head = fh.read(8)
    return next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)


def _channel_first(shape: tuple[int, ...]) -> bool:
    """The rule for arrays without axis labels: a short first axis holds the channels."""
    return shape[0] <= MAX_CHANNEL_FIRST and shape[0] < shape[1] and shape[0] < shape[2]


class _ReaderBase(Closeable):
    """Bounds checks, error wording and context-manager support shared by all readers."""

    path: Path

    def level_shape(self, level: int = 0) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def level_count(self) -> int:
        return 1

    def _check_region(self, y: int, x: int, height: int, width: int, level: int) -> None:
        if not 0 <= level < self.level_count:
            raise UnshortcutError(
                f"{self.path}: level {level} does not exist ({self.level_count} levels)"
            )
        h, w = self.level_shape(level)
        if height < 0 or width < 0 or y < 0 or x < 0 or y + height > h or x + width > w:
            raise UnshortcutError(
                f"{self.path}: region y={y} x={x} height={height} width={width} "
                f"leaves the image ({h} x {w} at level {level})"
            )

    def _decode_error(self, exc: Exception) -> UnshortcutError:
        return UnshortcutError(f"{self.path}: cannot decode image data ({exc})")


class ArrayReader(_ReaderBase):
    """An image held by an array-like in memory or memory-mapped, loaded on first access.

    ``load`` returns the stored array; ``move`` maps one stored-layout slice
    ``(rows, cols)`` to channel-last pixels. Only the touched part of a memmap is read.
    """

    def __init__(
        self,
        path: Path,
        shape: tuple[int, int, int],
        dtype: np.dtype,
        load: Callable[[], np.ndarray],
        channel_first: bool,
    ) -> None:
        self.path = path
        self._shape = shape
        self._dtype = np.dtype(dtype)
        self._load = load
        self._channel_first = channel_first
        self._array: np.ndarray | None = None

    def level_shape(self, level: int = 0) -> tuple[int, int]:
        return self._shape[0], self._shape[1]

    def level_downsample(self, level: int) -> float:
        return 1.0

    @property
    def channels(self) -> int:
        return self._shape[2]

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def read_region(self, y: int, x: int, height: int, width: int, level: int = 0) -> np.ndarray:
        self._check_region(y, x, height, width, level)
        if self._array is None:
            try:
                self._array = self._load()
            except UnshortcutError:
                raise
            except Exception as exc:
                raise self._decode_error(exc) from None
        array = self._array
        if array.ndim == 2:
            region = array[y : y + height, x : x + width, None]
        elif self._channel_first:
            region = array[:, y : y + height, x : x + width].transpose(1, 2, 0)
        else:
            region = array[y : y + height, x : x + width]
        try:
            return np.ascontiguousarray(region, dtype=self._dtype)
        except Exception as exc:  # a truncated memmap fails here
            raise self._decode_error(exc) from None

    def close(self) -> None:
        self._array = None


# --- PNG / JPEG --------------------------------------------------------------------------

# Pillow mode -> (mode to convert to or None, channels, dtype); alpha is not a signal.
_PILLOW_MODES: dict[str, tuple[str | None, int, str]] = {
    "1": ("L", 1, "uint8"),
    "L": (None, 1, "uint8"),
    "LA": ("L", 1, "uint8"),
    "La": ("L", 1, "uint8"),
    "P": ("RGB", 3, "uint8"),
    "PA": ("RGB", 3, "uint8"),
    "RGB": (None, 3, "uint8"),
    "RGBA": ("RGB", 3, "uint8"),
    "RGBa": ("RGB", 3, "uint8"),
    "RGBX": ("RGB", 3, "uint8"),
    "CMYK": ("RGB", 3, "uint8"),
    "YCbCr": ("RGB", 3, "uint8"),
    "I;16": (None, 1, "uint16"),
    "I;16L": (None, 1, "uint16"),
    "I;16B": (None, 1, "uint16"),
    "I;16N": (None, 1, "uint16"),
    "I": (None, 1, "int32"),
    "F": (None, 1, "float32"),
}


def _pillow_reader(path: Path, palette_indices: bool) -> ArrayReader:
    from PIL import Image

    try:
        with Image.open(path) as image:
            mode, (width, height) = image.mode, image.size
    except Exception as exc:
        raise UnshortcutError(f"{path}: not a readable PNG/JPEG image ({exc})") from None
    if mode not in _PILLOW_MODES:
        raise UnshortcutError(f"{path}: unsupported image mode {mode!r}")
    convert, channels, dtype = _PILLOW_MODES[mode]
    if palette_indices and mode == "P":
        convert, channels = None, 1

    def load() -> np.ndarray:
        # Whole-image decode is unavoidable for PNG/JPEG; the pixel limit guards web
        # servers against decompression bombs, not a user's own slide.
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(path) as image:
                image.load()
                decoded = image.convert(convert) if convert else image
                return np.asarray(decoded).astype(dtype, copy=False)
        finally:
            Image.MAX_IMAGE_PIXELS = limit

    return ArrayReader(path, (height, width, channels), np.dtype(dtype), load, False)


# --- NPY ---------------------------------------------------------------------------------


def _npy_reader(path: Path) -> ArrayReader:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise UnshortcutError(f"{path}: not a readable .npy array ({exc})") from None
    return _array_reader(path, array, None)


def _array_reader(path: Path, array: np.ndarray, axes: str | None) -> ArrayReader:
    """Reader over a (memory-mapped) 2D/3D array; ``axes`` like 'CYX'/'YXS' when known."""
    if not (array.dtype == np.bool_ or array.dtype.kind in "iuf"):
        raise UnshortcutError(f"{path}: unsupported pixel type {array.dtype}")
    if array.ndim not in (2, 3):
        raise UnshortcutError(f"{path}: expected a 2D or 3D array, got shape {tuple(array.shape)}")
    if array.ndim == 2:
        shape, first = (array.shape[0], array.shape[1], 1), False
    else:
        first = axes.index("Y") == 1 if axes else _channel_first(array.shape)
        c, h, w = array.shape if first else (array.shape[2], *array.shape[:2])
        shape = (h, w, c)
    return ArrayReader(path, shape, array.dtype.newbyteorder("="), lambda: array, first)


# --- TIFF --------------------------------------------------------------------------------

_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            workers = min(8, os.cpu_count() or 1)
            _EXECUTOR = ThreadPoolExecutor(workers, thread_name_prefix="unshortcut-decode")
        return _EXECUTOR


class _TileCache:
    """Least-recently-used decoded tiles, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self._tiles: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes

    def get(self, key: tuple[int, int, int]) -> np.ndarray | None:
        tile = self._tiles.get(key)
        if tile is not None:
            self._tiles.move_to_end(key)
        return tile

    def put(self, key: tuple[int, int, int], tile: np.ndarray) -> None:
        if tile.nbytes > self._max_bytes or key in self._tiles:
            return
        self._tiles[key] = tile
        self._bytes += tile.nbytes
        while self._bytes > self._max_bytes:
            _, old = self._tiles.popitem(last=False)
            self._bytes -= old.nbytes

    def clear(self) -> None:
        self._tiles.clear()
        self._bytes = 0


class _TiledLevel:
    """One pyramid level stored as tiles or strips in one or more pages.

    Pages stack along a channel axis (OME 'CYX'), each page holds ``planes`` separate
    sample planes ('SYX') of ``samples`` interleaved samples ('YXS'); channel index =
    (page, plane, sample) in C order, which is the order of the series axes.
    """

    def __init__(self, series: Any, path: Path) -> None:
        key = series.keyframe
        self.pages = list(series.pages)
        if any(page is None for page in self.pages):
            raise UnshortcutError(f"{path}: missing pages in TIFF series")
        self.keyframe = key
        planes, depth, height, width, samples = key.shaped
        if depth != 1:
            raise UnshortcutError(f"{path}: volumetric TIFF tiles are not supported")
        self.planes, self.samples = planes, samples
        self.shape = (height, width)
        self.dtype = np.dtype(series.dtype)
        self.channels = len(self.pages) * planes * samples
        if key.is_tiled:
            self.tile = (key.tilelength, key.tilewidth)
        else:
            self.tile = (min(key.rowsperstrip or height, height), width)
        self.grid = (math.ceil(height / self.tile[0]), math.ceil(width / self.tile[1]))
        per_page = planes * self.grid[0] * self.grid[1]
        if any(len(page.dataoffsets) != per_page for page in self.pages):
            raise UnshortcutError(f"{path}: unexpected TIFF tile layout")


class TiffReader(_ReaderBase):
    """Lazy TIFF/OME-TIFF reader: memory-map when uncompressed, else decode tiles on demand."""

    def __init__(self, path: Path) -> None:
        import tifffile

        self.path = path
        try:
            self._tif = tifffile.TiffFile(path)
        except Exception as exc:
            raise UnshortcutError(f"{path}: not a readable TIFF file ({exc})") from None
        try:
            self._levels = [self._make_level(level) for level in self._tif.series[0].levels]
        except UnshortcutError:
            self._tif.close()
            raise
        except Exception as exc:
            self._tif.close()
            raise UnshortcutError(f"{path}: not a readable TIFF file ({exc})") from None
        self._cache = _TileCache(TILE_CACHE_BYTES)
        self._lock = threading.RLock()
        first = self._levels[0]
        self._channels = first.channels
        self._dtype = np.dtype(first.dtype).newbyteorder("=")
        if any(level.channels != self._channels for level in self._levels):
            raise UnshortcutError(f"{path}: pyramid levels differ in channel count")

    def _make_level(self, series: Any) -> ArrayReader | _TiledLevel:
        axes, shape = series.axes, series.shape
        for axis in "ZT":
            if axis in axes:
                size = shape[axes.index(axis)]
                raise UnshortcutError(
                    f"{self.path}: has a {axis} axis of {size} planes; only 2D images "
                    "(with channels) are supported"
                )
        if series.dataoffset is not None:  # uncompressed and contiguous: memory-map
            if axes not in ("YX", "YXS", "SYX", "CYX", "QYX", "IYX", "YXC"):
                raise UnshortcutError(f"{self.path}: unsupported TIFF axes {axes!r}")
            memmap = np.memmap(
                self.path,
                dtype=np.dtype(series.dtype).newbyteorder(self._tif.byteorder),
                mode="r",
                offset=series.dataoffset,
                shape=shape,
            )
            known = None if axes[0] in "QI" else axes.replace("S", "C")
            return _array_reader(self.path, memmap, known)
        level = _TiledLevel(series, self.path)
        if level.shape != (shape[axes.index("Y")], shape[axes.index("X")]):
            raise UnshortcutError(
                f"{self.path}: compressed TIFF stores one page per image row; save it as "
                "one (height, width, channels) page, e.g. tifffile.imwrite(..., "
                "photometric='minisblack', planarconfig='contig')"
            )
        return level

    @property
    def level_count(self) -> int:
        return len(self._levels)

    def level_shape(self, level: int = 0) -> tuple[int, int]:
        entry = self._levels[level]
        return entry.shape if isinstance(entry, _TiledLevel) else entry.level_shape()

    def level_downsample(self, level: int) -> float:
        (h0, w0), (h, w) = self.level_shape(0), self.level_shape(level)
        return (h0 / h + w0 / w) / 2

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def read_region(self, y: int, x: int, height: int, width: int, level: int = 0) -> np.ndarray:
        self._check_region(y, x, height, width, level)
        entry = self._levels[level]
        if isinstance(entry, ArrayReader):
            return entry.read_region(y, x, height, width)
        return self._assemble(level, entry, y, x, height, width, use_cache=True)

    def iter_bands(self, band_height: int, level: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Full-width bands of ``band_height`` rows; each tile is decoded exactly once.

        Whole tile rows are decoded (in parallel) as a band needs them; rows past the band
        are carried over to the next one, so band and tile heights need not align.
        """
        if band_height < 1:
            raise ValueError("band_height must be positive")
        self._check_region(0, 0, 0, 0, level)
        entry = self._levels[level]
        height, width = self.level_shape(level)
        if isinstance(entry, ArrayReader):
            for y in range(0, height, band_height):
                yield y, entry.read_region(y, 0, min(band_height, height - y), width)
            return
        tile_h = entry.tile[0]
        carry = np.empty((0, width, self._channels), self._dtype)
        carry_y = 0  # image row of carry[0]
        for y in range(0, height, band_height):
            end = min(y + band_height, height)
            decoded_to = carry_y + len(carry)
            if decoded_to < end:
                stop = min(math.ceil(end / tile_h) * tile_h, height)
                fresh = self._assemble(
                    level, entry, decoded_to, 0, stop - decoded_to, width, use_cache=False
                )
                carry = np.concatenate([carry, fresh]) if len(carry) else fresh
            yield y, carry[y - carry_y : end - carry_y]
            carry, carry_y = carry[end - carry_y :], end

    def iter_block_sums(
        self,
        factor: int,
        level: int = 0,
        prepare: TileReduce | None = None,
        rows: int | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """:func:`iter_block_sums` one tile row at a time, each tile summed as it decodes.

        Needs tiles whose sides are multiples of ``factor`` (and, with ``prepare``, one
        page holding every channel); otherwise full-width bands are summed instead.
        """
        self._check_region(0, 0, 0, 0, level)
        entry = self._levels[level]
        height, width = self.level_shape(level)
        limit = _block_limit(height, factor, rows)
        if not (
            isinstance(entry, _TiledLevel)
            and entry.tile[0] % factor == 0
            and entry.tile[1] % factor == 0
            and (prepare is None or len(entry.pages) * entry.planes == 1)
        ):
            step = block_band_rows(factor)
            yield from block_sums_of_bands(self.iter_bands(step, level), factor, prepare, limit)
            return
        tile_blocks = entry.tile[0] // factor

        def reduce(tile: np.ndarray) -> np.ndarray:
            if prepare is None:
                return block_sum(tile, factor)
            values = prepare(tile)[..., None]
            if values.any():
                return block_sum(values, factor)
            # Most tiles of a mask are empty: their counts need no summing.
            shape = (tile.shape[0] // factor, tile.shape[1] // factor, 1)
            return np.zeros(shape, accumulators(values.dtype, factor)[1])

        for top in range(0, limit, tile_blocks):
            sums = self._assemble_tile_row(level, entry, top // tile_blocks, factor, reduce)
            sums = sums[: limit - top, : width // factor]
            yield top, sums if prepare is None else sums[..., 0]

    def _assemble_tile_row(
        self, level: int, entry: _TiledLevel, row: int, factor: int, reduce: TileReduce
    ) -> np.ndarray:
        """Reduced tiles of tile row ``row`` (every page and plane) side by side."""
        (tile_h, tile_w), (_, cols) = entry.tile, entry.grid
        per_plane = entry.grid[0] * cols
        wanted = [
            (page_i, plane, plane * per_plane + row * cols + tx, tx)
            for page_i in range(len(entry.pages))
            for plane in range(entry.planes)
            for tx in range(cols)
        ]
        keys = [(page_i, index) for page_i, _, index, _ in wanted]
        tiles = self._tiles(level, entry, keys, use_cache=False, reduce=reduce)
        block_h, block_w = tile_h // factor, tile_w // factor
        channels = tiles[0].shape[2] * len(entry.pages) * entry.planes
        out = np.empty((block_h, block_w * cols, channels), tiles[0].dtype)
        for (page_i, plane, _, tx), tile in zip(wanted, tiles, strict=True):
            c0 = (page_i * entry.planes + plane) * tile.shape[2]
            out[:, tx * block_w : (tx + 1) * block_w, c0 : c0 + tile.shape[2]] = tile
        return out

    def _assemble(
        self,
        level: int,
        entry: _TiledLevel,
        y: int,
        x: int,
        height: int,
        width: int,
        use_cache: bool,
    ) -> np.ndarray:
        out = np.empty((height, width, self._channels), self._dtype)
        if height == 0 or width == 0:
            return out
        (tile_h, tile_w), (_, cols) = entry.tile, entry.grid
        rows_needed = range(y // tile_h, (y + height - 1) // tile_h + 1)
        cols_needed = range(x // tile_w, (x + width - 1) // tile_w + 1)
        per_plane = entry.grid[0] * cols
        wanted = [
            (page_i, plane, plane * per_plane + ty * cols + tx, ty, tx)
            for page_i in range(len(entry.pages))
            for plane in range(entry.planes)
            for ty in rows_needed
            for tx in cols_needed
        ]
        tiles = self._tiles(level, entry, [(p, i) for p, _, i, _, _ in wanted], use_cache)
        for (page_i, plane, _, ty, tx), tile in zip(wanted, tiles, strict=True):
            y0, x0 = max(y, ty * tile_h), max(x, tx * tile_w)
            y1, x1 = min(y + height, (ty + 1) * tile_h), min(x + width, (tx + 1) * tile_w)
            c0 = (page_i * entry.planes + plane) * entry.samples
            out[y0 - y : y1 - y, x0 - x : x1 - x, c0 : c0 + entry.samples] = tile[
                y0 - ty * tile_h : y1 - ty * tile_h, x0 - tx * tile_w : x1 - tx * tile_w
            ]
        return out

    def _tiles(
        self,
        level: int,
        entry: _TiledLevel,
        keys: list[tuple[int, int]],
        use_cache: bool,
        reduce: TileReduce | None = None,
    ) -> list[np.ndarray]:
        """Decoded (tile_h, tile_w, samples) tiles for (page, segment index) keys.

        With ``reduce``, each tile is passed through it in the decode thread and only the
        result is returned (never cached).
        """
        try:
            return self._tiles_unchecked(level, entry, keys, use_cache and reduce is None, reduce)
        except UnshortcutError:
            raise
        except Exception as exc:  # truncated file, corrupt tile, codec failure
            raise self._decode_error(exc) from None

    def _tiles_unchecked(
        self,
        level: int,
        entry: _TiledLevel,
        keys: list[tuple[int, int]],
        use_cache: bool,
        reduce: TileReduce | None,
    ) -> list[np.ndarray]:
        found: dict[int, np.ndarray] = {}
        if use_cache:
            for n, (page_i, index) in enumerate(keys):
                tile = self._cache.get((level, page_i, index))
                if tile is not None:
                    found[n] = tile
        missing = [n for n in range(len(keys)) if n not in found]
        jobs = []
        # Tiles with the same compressed bytes decode alike (empty mask tiles, blank
        # areas): each distinct one is decoded once and the result shared, read-only.
        same: dict[tuple[Any, bytes | None], list[int]] = {}
        with self._lock:
            fh = self._tif.filehandle
            for n in sorted(missing, key=lambda n: entry.pages[keys[n][0]].dataoffsets[keys[n][1]]):
                page = entry.pages[keys[n][0]]
                offset, count = page.dataoffsets[keys[n][1]], page.databytecounts[keys[n][1]]
                data = None
                if offset and count:
                    fh.seek(offset)
                    data = fh.read(count)
                twins = same.setdefault((page.jpegtables, data), [])
                if not twins:
                    jobs.append((n, page, keys[n][1], data))
                twins.append(n)
        decode = self._decoder(entry, reduce)
        results = _executor().map(decode, jobs) if len(jobs) > 1 else (decode(job) for job in jobs)
        for (_, page, _, data), tile in zip(jobs, results, strict=True):
            for n in same[(page.jpegtables, data)]:
                found[n] = tile
                if use_cache:
                    self._cache.put((level, *keys[n]), tile)
        return [found[n] for n in range(len(keys))]

    def _decoder(
        self, entry: _TiledLevel, reduce: TileReduce | None
    ) -> Callable[[tuple[int, Any, int, Any]], np.ndarray]:
        key = entry.keyframe
        tile_shape = (*entry.tile, entry.samples)

        def decode(job: tuple[int, Any, int, bytes | None]) -> np.ndarray:
            _, page, index, data = job
            if data is None:  # sparse tile: never written, reads as zeros
                tile = np.zeros(tile_shape, self._dtype)
            else:
                tile = key.decode(
                    data,
                    index,
                    jpegtables=page.jpegtables,
                    jpegheader=key.jpegheader,
                    _fullsize=True,
                )[0]
                if tile is None or tile.size != math.prod(tile_shape):
                    raise ValueError(f"tile {index} is truncated")
                tile = tile.reshape(tile_shape).astype(self._dtype, copy=False)
            return reduce(tile) if reduce else tile

        return decode

    def reduce_tiles(self, level: int, reduce: TileReduce) -> list[np.ndarray] | None:
        """``reduce`` of every distinct tile of a tiled ``level`` (None for other levels).

        Tiles with identical compressed bytes are decoded once: a mask is mostly empty
        tiles that compress alike, so scanning its values (largest value, distinct
        values) costs a few decodes, not a pass over the file. Edge tiles are cropped to
        the image before ``reduce`` sees them.
        """
        self._check_region(0, 0, 0, 0, level)
        entry = self._levels[level]
        if not isinstance(entry, _TiledLevel):
            return None
        (tile_h, tile_w), (rows, cols) = entry.tile, entry.grid
        height, width = entry.shape
        by_valid_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for page_i, page in enumerate(entry.pages):
            for index in range(len(page.dataoffsets)):
                ty, tx = divmod(index % (rows * cols), cols)
                valid = (min(tile_h, height - ty * tile_h), min(tile_w, width - tx * tile_w))
                by_valid_shape.setdefault(valid, []).append((page_i, index))
        results: list[np.ndarray] = []
        for (h, w), keys in by_valid_shape.items():

            def cropped(tile: np.ndarray, h: int = h, w: int = w) -> np.ndarray:
                return reduce(tile[:h, :w])

            results += self._tiles(level, entry, keys, False, reduce=cropped)
        return results

    def close(self) -> None:
        self._cache.clear()
        self._tif.close()


# --- OpenSlide ---------------------------------------------------------------------------


class OpenSlideReader(_ReaderBase):
    """Whole-slide formats through OpenSlide; RGBA is composited onto the slide background."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            import openslide
        except ImportError:
            raise UnshortcutError(
                f"{path}: reading {path.suffix} slides needs OpenSlide; install it with "
                "pip install 'unshortcut[openslide]'"
            ) from None
        try:
            self._slide = openslide.OpenSlide(str(path))
        except Exception as exc:
            raise UnshortcutError(f"{path}: not a readable slide ({exc})") from None
        colour = self._slide.properties.get("openslide.background-color", "FFFFFF")
        self._background = np.array([int(colour[i : i + 2], 16) for i in (0, 2, 4)], np.uint16)

    @property
    def level_count(self) -> int:
        return int(self._slide.level_count)

    def level_shape(self, level: int = 0) -> tuple[int, int]:
        width, height = self._slide.level_dimensions[level]
        return int(height), int(width)

    def level_downsample(self, level: int) -> float:
        return float(self._slide.level_downsamples[level])

    @property
    def channels(self) -> int:
        return 3

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    def read_region(self, y: int, x: int, height: int, width: int, level: int = 0) -> np.ndarray:
        self._check_region(y, x, height, width, level)
        scale = self.level_downsample(level)
        try:
            rgba = np.asarray(
                self._slide.read_region(
                    (round(x * scale), round(y * scale)), level, (width, height)
                )
            )
        except Exception as exc:
            raise self._decode_error(exc) from None
        alpha = rgba[..., 3:].astype(np.uint16)
        mixed = (rgba[..., :3] * alpha + self._background * (255 - alpha) + 127) // 255
        return mixed.astype(np.uint8)

    def close(self) -> None:
        self._slide.close()
