"""Position-keyed random fields: the same pixel gets the same value in any tile.

Every random quantity of a synthetic image is a pure function of (seed, pixel or
lattice position), computed with an integer hash instead of a stateful generator.
That is what lets an image of any size be rendered tile by tile, in any order and
with any halo, and still be byte-identical to rendering it whole.
"""

from __future__ import annotations

import zlib

import numpy as np
from scipy.ndimage import gaussian_filter

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xC2B2AE3D27D4EB4F)
_M3 = np.uint64(0x165667B19E3779F9)
_F1 = np.uint64(0xBF58476D1CE4E5B9)
_F2 = np.uint64(0x94D049BB133111EB)
_TWO53 = 2.0**-53


def field_seed(image_seed: int, name: str) -> int:
    """Seed of one named random field of one image: distinct per (image, field)."""
    return ((image_seed & 0xFFFFFFFF) << 32) | zlib.crc32(name.encode())


def hash_uniform(iy: np.ndarray, ix: np.ndarray, seed: int) -> np.ndarray:
    """Uniform [0, 1) values keyed by integer positions (broadcast) and a seed.

    A splitmix64 finaliser over a linear mix of the coordinates: cheap, vectorised,
    and statistically good enough for textures.
    """
    with np.errstate(over="ignore"):
        h = np.asarray(iy).astype(np.int64).astype(np.uint64) * _M1
        h = h ^ (np.asarray(ix).astype(np.int64).astype(np.uint64) * _M2)
        h = h ^ (np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _M3)
        h = h ^ (h >> np.uint64(30))
        h = h * _F1
        h = h ^ (h >> np.uint64(27))
        h = h * _F2
        h = h ^ (h >> np.uint64(31))
    return ((h >> np.uint64(11)).astype(np.float64) * _TWO53).astype(np.float32)


def hash_normal(iy: np.ndarray, ix: np.ndarray, seed: int) -> np.ndarray:
    """Standard normal values keyed by position (Box-Muller over two hashes)."""
    u1 = hash_uniform(iy, ix, seed)
    u2 = hash_uniform(iy, ix, seed ^ 0x5BD1E995)
    radius = np.sqrt(-2.0 * np.log1p(-u1))
    return (radius * np.cos(np.float32(2.0 * np.pi) * u2)).astype(np.float32)


def bspline_matrix(coords: np.ndarray, cell: float) -> tuple[np.ndarray, int]:
    """Cubic B-spline weights from lattice nodes to ``coords``; returns (W, first node)."""
    t = coords.astype(np.float64) / cell
    base = np.floor(t).astype(np.int64)
    frac = t - base
    first = int(base.min()) - 1
    n_nodes = int(base.max()) - first + 3
    weights = np.zeros((coords.size, n_nodes), dtype=np.float32)
    rows = np.arange(coords.size)
    one = 1.0 - frac
    taps = (
        one**3 / 6.0,
        (3.0 * frac**3 - 6.0 * frac**2 + 4.0) / 6.0,
        (-3.0 * frac**3 + 3.0 * frac**2 + 3.0 * frac + 1.0) / 6.0,
        frac**3 / 6.0,
    )
    for k, tap in enumerate(taps):
        weights[rows, base - 1 + k - first] += tap
    return weights, first


# Standard deviation of a 2-D cubic B-spline over unit-variance Gaussian nodes,
# measured over many cells (the sum of squared 1-D weights is 0.46..0.50 per axis).
_BSPLINE_STD = 0.482


def value_noise(ys: np.ndarray, xs: np.ndarray, cell: float, seed: int) -> np.ndarray:
    """Smooth Gaussian noise (about N(0, 1)) with correlation length ``cell`` pixels.

    ``ys`` and ``xs`` are the 1-D pixel coordinates of a rectangular window. The
    field is a cubic B-spline over hashed Gaussian lattice nodes, evaluated as two
    small matrix products (separable), so coarse fields over large windows are cheap.
    """
    wy, y0 = bspline_matrix(ys, cell)
    wx, x0 = bspline_matrix(xs, cell)
    ny, nx = wy.shape[1], wx.shape[1]
    nodes = hash_normal(np.arange(y0, y0 + ny)[:, None], np.arange(x0, x0 + nx)[None, :], seed)
    return (wy @ nodes @ wx.T) / np.float32(_BSPLINE_STD)


def fractal_noise(
    ys: np.ndarray, xs: np.ndarray, cell: float, seed: int, octaves: int, gain: float = 0.5
) -> np.ndarray:
    """Sum of ``octaves`` value-noise layers, each half the cell and ``gain`` the weight.

    Normalised back to unit variance, so thresholds keep their Gaussian meaning.
    """
    total = np.zeros((ys.size, xs.size), dtype=np.float32)
    norm = 0.0
    for octave in range(octaves):
        weight = gain**octave
        total += np.float32(weight) * value_noise(ys, xs, cell / 2**octave, seed + 7919 * octave)
        norm += weight**2
    return total / np.float32(np.sqrt(norm))


def white_uniform(ys: np.ndarray, xs: np.ndarray, seed: int) -> np.ndarray:
    """One uniform [0, 1) value per pixel of the window."""
    return hash_uniform(ys[:, None], xs[None, :], seed)


def blurred_white(ys: np.ndarray, xs: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Fine-grained unit-variance noise: white noise under a Gaussian blur of ``sigma``.

    Much cheaper than :func:`value_noise` for correlation lengths of a few pixels.
    The blur needs ``3 * sigma`` pixels of context, so values within that distance of
    the window edge differ between tilings; callers crop a halo at least that wide.
    """
    white = (white_uniform(ys, xs, seed) - np.float32(0.5)) * np.float32(np.sqrt(12.0))
    return gaussian_filter(white, sigma, truncate=3.0) * np.float32(np.sqrt(4 * np.pi) * sigma)
