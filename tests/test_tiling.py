"""Patch grid, one-pass band tiling, area resizing and the labelling rule, on small arrays."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unshortcut.errors import UnshortcutError
from unshortcut.tiling.bands import tile_image
from unshortcut.tiling.grid import labels_from_fractions, make_grid, pool_factor, thumbnail_factor


class ArrayImage:
    """An in-memory ImageReader with one level that counts how many rows it decodes."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels if pixels.ndim == 3 else pixels[:, :, None]
        self.path = Path("array.npy")
        self.rows_read = 0

    level_count = 1

    def level_shape(self, level: int = 0) -> tuple[int, int]:
        return self.pixels.shape[0], self.pixels.shape[1]

    def level_downsample(self, level: int) -> float:
        return 1.0

    @property
    def channels(self) -> int:
        return self.pixels.shape[2]

    @property
    def dtype(self) -> np.dtype:
        return self.pixels.dtype

    def read_region(self, y: int, x: int, height: int, width: int, level: int = 0) -> np.ndarray:
        self.rows_read += height
        return self.pixels[y : y + height, x : x + width].copy()

    def close(self) -> None:
        pass


class ArrayMask:
    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask.astype(bool)

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape

    def read_region(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        return self.mask[y : y + height, x : x + width].copy()


def run_tiling(image: np.ndarray, mask: np.ndarray, size: int, stride: int, input_size: int):
    reader = ArrayImage(image)
    grid = make_grid(image.shape[0], image.shape[1], size, stride, "array")
    pixel_out, mask_out = io.BytesIO(), io.BytesIO()
    tiled = tile_image(
        reader, ArrayMask(mask), grid, 0, 1, input_size, pixel_out, mask_out, want_thumbnail=True
    )
    n = grid.rows * grid.cols
    pixels = np.frombuffer(pixel_out.getvalue(), dtype=image.dtype).reshape(
        n, reader.channels, input_size, input_size
    )
    masks = np.frombuffer(mask_out.getvalue(), dtype=np.uint8).reshape(n, input_size, input_size)
    return grid, tiled, pixels, masks, reader


def block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """Reference (h, w, C) -> (h/f, w/f, C) block mean in float64."""
    h, w, c = a.shape
    return a.reshape(h // f, f, w // f, f, c).astype(np.float64).mean(axis=(1, 3))


def test_grid_positions_and_errors() -> None:
    grid = make_grid(8, 10, 4, 2, "img")
    assert (grid.rows, grid.cols) == (3, 4)
    assert grid.ys.tolist() == [0, 2, 4]
    assert grid.xs.tolist() == [0, 2, 4, 6]
    assert (grid.covered_height, grid.covered_width) == (8, 10)
    sparse = make_grid(10, 10, 3, 4, "img")
    assert sparse.ys.tolist() == [0, 4] and sparse.covered_height == 7
    with pytest.raises(UnshortcutError, match=r"img: patch size 12 is larger than the image"):
        make_grid(8, 16, 12, 12, "img")


def test_hand_computed_8x8_labels_fractions_and_masks() -> None:
    # 8x8 image, 4x4 patches, input size 2. Tumor pixels: one in the top-left patch,
    # a 2x4 strip in the top-right patch, none bottom-left, all 16 bottom-right.
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[0, 0] = 1
    mask[2:4, 4:8] = 1
    mask[4:8, 4:8] = 1
    image = np.arange(64, dtype=np.uint8).reshape(8, 8)
    _grid, tiled, pixels, masks, _ = run_tiling(image, mask, 4, 4, 2)
    np.testing.assert_allclose(tiled.tumor_fraction, [1 / 16, 8 / 16, 0, 1])
    assert labels_from_fractions(tiled.tumor_fraction, None).tolist() == [1, 1, 0, 1]
    assert labels_from_fractions(tiled.tumor_fraction, 0.5).tolist() == [0, 1, 0, 1]
    # Per-input-pixel masks: each input pixel covers 2x2 full-resolution pixels.
    assert masks[0].tolist() == [[64, 0], [0, 0]]  # round(255 * 1/4) = 64
    assert masks[1].tolist() == [[0, 0], [255, 255]]
    assert masks[2].tolist() == [[0, 0], [0, 0]]
    assert masks[3].tolist() == [[255, 255], [255, 255]]
    # Pixels: the top-left input pixel of patch 0 averages 0, 1, 8, 9 -> 4.5 -> rounds up.
    assert pixels[0, 0].tolist() == [[5, 7], [21, 23]]
    assert pixels[3, 0].tolist() == [[41, 43], [57, 59]]


@pytest.mark.parametrize(("size", "stride", "input_size"), [(32, 32, 8), (32, 16, 8), (16, 24, 4)])
def test_resize_equals_block_mean(size: int, stride: int, input_size: int) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (80, 112, 3), dtype=np.uint8)
    mask = rng.random((80, 112)) < 0.3
    grid, tiled, pixels, masks, reader = run_tiling(image, mask, size, stride, input_size)
    f = size // input_size
    index = 0
    for y in grid.ys:
        for x in grid.xs:
            crop = image[y : y + size, x : x + size]
            expected = np.floor(block_mean(crop, f) + 0.5).astype(np.uint8).transpose(2, 0, 1)
            np.testing.assert_array_equal(pixels[index], expected)
            mcrop = mask[y : y + size, x : x + size]
            assert tiled.tumor_fraction[index] == pytest.approx(mcrop.mean())
            expected_mask = np.floor(255 * block_mean(mcrop[:, :, None], f)[:, :, 0] + 0.5)
            np.testing.assert_array_equal(masks[index], expected_mask)
            index += 1
    # One decode pass: every covered row is read exactly once, overlap or not.
    assert reader.rows_read == grid.covered_height


def test_non_integer_footprint_uses_adaptive_area_pooling() -> None:
    rng = np.random.default_rng(1)
    image = rng.random((30, 30, 2)).astype(np.float32)
    mask = rng.random((30, 30)) < 0.5
    grid, tiled, pixels, _masks, _ = run_tiling(image, mask, 12, 6, 5)
    assert pool_factor(12, 6, 5) is None
    crop = torch.from_numpy(image[6:18, 12:24].transpose(2, 0, 1).copy())[None]
    expected = F.adaptive_avg_pool2d(crop, 5)[0].numpy()
    np.testing.assert_allclose(pixels[1 * grid.cols + 2], expected, rtol=1e-6)
    assert tiled.tumor_fraction[1 * grid.cols + 2] == pytest.approx(mask[6:18, 12:24].mean())


@pytest.mark.parametrize(
    ("height", "width", "size", "input_size", "factor"),
    [(4200, 40, 32, 8, 2), (4200, 40, 32, 5, 2), (2112, 2112, 64, 32, 4)],
)
def test_thumbnail_is_block_mean_of_covered_area(
    height: int, width: int, size: int, input_size: int, factor: int
) -> None:
    # Thumbnail finer than the pooled patches (2 vs 4), no block pooling (input 5), and
    # coarser than the pooled patches (4 vs 2: sums of the pooled sums).
    rng = np.random.default_rng(2)
    image = rng.integers(0, 65535, (height, width, 3), dtype=np.uint16)
    grid, tiled, _, _, _ = run_tiling(image, np.zeros((height, width)), size, size, input_size)
    d = tiled.thumbnail_downsample
    assert d == thumbnail_factor(size, size, height, width) == factor
    covered = image[: grid.covered_height, : grid.covered_width]
    expected = np.floor(block_mean(covered, d) + 0.5).astype(np.uint16)
    assert tiled.thumbnail is not None and tiled.thumbnail.dtype == np.uint16
    np.testing.assert_array_equal(tiled.thumbnail, expected)


def test_thumbnail_factor_divides_patch_and_stride_and_bounds_size() -> None:
    assert thumbnail_factor(256, 256, 20000, 20000) == 16
    assert thumbnail_factor(256, 96, 20000, 20000) == 16
    assert thumbnail_factor(32, 32, 1500, 664) == 1
    assert thumbnail_factor(256, 256, 4096, 4096) == 4
    big = thumbnail_factor(256, 256, 200_000, 200_000)
    assert big == 64 and 200_000 / big <= 4096


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_other_dtypes_keep_their_dtype(dtype: type) -> None:
    rng = np.random.default_rng(3)
    image = (rng.random((16, 16, 2)) * 60000).astype(dtype)
    _, _, pixels, _, _ = run_tiling(image, np.zeros((16, 16)), 8, 8, 2)
    assert pixels.dtype == dtype
    expected = block_mean(image[8:16, 0:8], 4).transpose(2, 0, 1)
    if dtype is np.uint16:
        expected = np.floor(expected + 0.5)
    np.testing.assert_allclose(pixels[2], expected, rtol=1e-6)
