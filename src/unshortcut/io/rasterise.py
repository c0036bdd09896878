"""Polygons -> boolean masks, band by band, at any resolution, never a whole slide at once.

Pixel rule: a pixel is inside when its centre is inside the geometry (the rule GDAL's
rasterize uses by default). Pixel (row r, column c) at ``downsample`` d covers level-0
x in [c d, (c + 1) d), y in [r d, (r + 1) d); its centre is ((c + 0.5) d, (r + 0.5) d).
So a polygon's area is matched on average, not exactly, and a sliver thinner than a
pixel may cover no pixel centre; a centre exactly on an edge falls on one side
consistently (left and top edges inside, right and bottom outside).

How: an even-odd scanline fill. For every pixel row, the crossings of all ring edges
with the row's centre line are found at once (vectorised over edges), each crossing
toggles the parity of the pixels to its right, and a running sum along the row gives
inside/outside. Rings of a valid geometry never cross, so even-odd over exterior and
hole rings is exactly the interior. Cost is one pass over the crossings plus one over
the columns between the first and last crossing of the band; bands no edge crosses
cost nothing. ``skimage.draw.polygon`` tests every pixel of the bounding box against
every vertex: 180 s for a 5000 x 5000 px region of a 2000-vertex outline, where this
takes a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from unshortcut.blocks import accumulators, block_sum
from unshortcut.errors import UnshortcutError
from unshortcut.io.base import Closeable
from unshortcut.io.readers import block_band_rows


def ring_edges(geometry: BaseGeometry) -> np.ndarray:
    """(E, 4) float64 edges ``x0, y0, x1, y1`` of every ring (exteriors and holes).

    Horizontal edges are dropped: they never cross a row's centre line.
    """
    if geometry.is_empty:
        return np.empty((0, 4))
    polygons = shapely.get_parts(geometry)
    rings = shapely.get_rings(polygons)
    coords, ring = shapely.get_coordinates(rings, return_index=True)
    same_ring = ring[1:] == ring[:-1]
    edges = np.column_stack([coords[:-1], coords[1:]])[same_ring]
    return edges[edges[:, 1] != edges[:, 3]]


def inside_span(
    edges: np.ndarray, top: int, left: int, height: int, width: int, downsample: float = 1.0
) -> tuple[int, np.ndarray]:
    """Pixel-centre fill of a window: ``(c0, inside)``, ``inside`` bool (height, c1 - c0).

    The window is rows [top, top + height) and columns [left, left + width) at
    ``downsample`` level-0 pixels per pixel; columns outside [c0, c1) (window-relative)
    are outside the geometry.
    """
    xa, ya = edges[:, 0] / downsample - left, edges[:, 1] / downsample - top
    xb, yb = edges[:, 2] / downsample - left, edges[:, 3] / downsample - top
    low, high = np.minimum(ya, yb), np.maximum(ya, yb)
    # Row r crosses an edge when low <= r + 0.5 < high.
    first = np.clip(np.ceil(low - 0.5), 0, height).astype(np.int64)
    stop = np.clip(np.ceil(high - 0.5), 0, height).astype(np.int64)
    count = np.maximum(stop - first, 0)
    total = int(count.sum())
    if total == 0:
        return 0, np.zeros((height, 0), bool)
    edge = np.repeat(np.arange(len(edges)), count)
    offset = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
    row = first[edge] + offset
    centre = row + 0.5
    x = xa[edge] + (centre - ya[edge]) * (xb[edge] - xa[edge]) / (yb[edge] - ya[edge])
    # A crossing at x changes the side of every pixel whose centre c + 0.5 is >= x.
    column = np.clip(np.ceil(x - 0.5), 0, width).astype(np.int64)
    c0, c1 = int(column.min()), int(column.max())
    if c1 <= c0:
        return 0, np.zeros((height, 0), bool)
    parity = np.zeros((height, c1 - c0), np.uint8)
    # Crossings at c1 only flip columns right of the last one, which are all outside.
    kept = column < c1
    np.add.at(parity, (row[kept], column[kept] - c0), 1)  # only parity matters: may wrap
    inside = np.cumsum(parity, axis=1, dtype=np.uint8) & 1
    return c0, inside.view(bool)


def rasterise(
    edges: np.ndarray, top: int, left: int, height: int, width: int, downsample: float = 1.0
) -> np.ndarray:
    """bool (height, width): the pixel-centre fill of a window (see :func:`inside_span`)."""
    out = np.zeros((height, width), bool)
    c0, inside = inside_span(edges, top, left, height, width, downsample)
    out[:, c0 : c0 + inside.shape[1]] = inside
    return out


class PolygonMask(Closeable):
    """A mask drawn from polygons on demand (the mask-source interface tiling reads).

    ``geometry`` is in level-0 pixels (x column, y row); ``shape`` is the image's level-0
    (height, width). An empty geometry is an all-background mask at no cost.
    """

    def __init__(
        self, geometry: BaseGeometry, shape: tuple[int, int], path: Path | None = None
    ) -> None:
        self.geometry = geometry
        self.path = path
        self._shape = shape
        self._edges = ring_edges(geometry)
        self._low = np.minimum(self._edges[:, 1], self._edges[:, 3])
        self._high = np.maximum(self._edges[:, 1], self._edges[:, 3])

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the image at level 0."""
        return self._shape

    def read_region(
        self, y: int, x: int, height: int, width: int, downsample: float = 1.0
    ) -> np.ndarray:
        """bool (height, width) of the rectangle at (row ``y``, column ``x``) in pixels of
        ``downsample`` level-0 pixels each (1 = full resolution)."""
        limit_h, limit_w = (int(np.ceil(side / downsample)) for side in self._shape)
        if min(y, x, height, width) < 0 or y + height > limit_h or x + width > limit_w:
            raise UnshortcutError(
                f"{self.path or 'annotation'}: region y={y} x={x} height={height} "
                f"width={width} leaves the image ({limit_h} x {limit_w} at downsample "
                f"{downsample:g})"
            )
        edges = self._edges_between(y * downsample, (y + height) * downsample)
        return rasterise(edges, y, x, height, width, downsample)

    def _edges_between(self, y0: float, y1: float) -> np.ndarray:
        """Edges whose vertical extent meets level-0 rows [y0, y1)."""
        return self._edges[(self._high >= y0) & (self._low < y1)]

    def iter_bands(self, band_height: int) -> Iterator[tuple[int, np.ndarray]]:
        """Full-width bool bands ``(y, band)`` at full resolution."""
        height, width = self._shape
        for y in range(0, height, band_height):
            yield y, self.read_region(y, 0, min(band_height, height - y), width)

    def iter_block_sums(
        self, factor: int, rows: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Inside pixels (full resolution) per ``factor`` x ``factor`` block, as
        ``(block_row, counts)``, for the first ``rows`` block rows (default: all) and
        ``width // factor`` block columns. Only the columns between a band's first and
        last crossing are filled and summed."""
        height, width = self._shape
        limit = height // factor if rows is None else min(rows, height // factor)
        cols = width // factor
        dtype = accumulators(np.dtype(bool), factor)[1]
        step = block_band_rows(factor)
        for y in range(0, limit * factor, step):
            band_h = min(step, limit * factor - y)
            counts = np.zeros((band_h // factor, cols), dtype)
            edges = self._edges_between(y, y + band_h)
            if len(edges):
                c0, inside = inside_span(edges, y, 0, band_h, cols * factor)
                b0, b1 = c0 // factor, -(-(c0 + inside.shape[1]) // factor)
                padded = np.zeros((band_h, (b1 - b0) * factor), bool)
                padded[:, c0 - b0 * factor : c0 - b0 * factor + inside.shape[1]] = inside
                counts[:, b0:b1] = block_sum(padded, factor)
            yield y // factor, counts

    def close(self) -> None:
        """Nothing to release: the geometry lives in memory."""
