"""Raster masks as users bring them: label maps with several classes, lower resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from unshortcut.errors import UnshortcutError
from unshortcut.io.masks import ScaledMask, mask_scale, open_mask

RNG = np.random.default_rng(11)


def block_sums(mask: np.ndarray, factor: int, rows: int | None = None) -> np.ndarray:
    limit = mask.shape[0] // factor if rows is None else rows
    cut = mask[: limit * factor, : mask.shape[1] // factor * factor]
    return cut.reshape(limit, factor, -1, factor).sum(axis=(1, 3))


# --- label maps --------------------------------------------------------------------------


def test_label_map_needs_its_values(tmp_path: Path) -> None:
    labels = RNG.integers(0, 3, (30, 40)).astype(np.uint8)  # 0 glass, 1 tissue, 2 tumor
    Image.fromarray(labels).save(tmp_path / "l.png")
    with pytest.raises(
        UnshortcutError,
        match=r"l\.png: values 0, 1, 2 fit no known mask encoding \(0/1, or 0/255 with JPEG "
        r"noise\); for a label map say which values are tumor, e.g. --tumor-values 2$",
    ):
        open_mask(tmp_path / "l.png")
    with open_mask(tmp_path / "l.png", values=(2,), allowed=(1,)) as tumor:
        assert tumor.threshold is None
        np.testing.assert_array_equal(tumor.read_region(0, 0, 30, 40), labels == 2)
        counts = np.concatenate([c for _, c in tumor.iter_block_sums(5)])
        np.testing.assert_array_equal(counts, block_sums(labels == 2, 5))
    with open_mask(tmp_path / "l.png", values=(1, 2), allowed=(2,)) as tissue:
        np.testing.assert_array_equal(tissue.read_region(0, 0, 30, 40), labels > 0)
    with pytest.raises(
        UnshortcutError,
        match=r"l\.png: values 0, 1, 2 fit no known mask encoding: the label map may only "
        r"hold 0, 2 \(0 is background",
    ):
        open_mask(tmp_path / "l.png", values=(2,))


def test_label_maps_of_other_dtypes(tmp_path: Path) -> None:
    labels = np.zeros((300, 200), np.uint16)
    labels[40:90, 10:150] = 7
    labels[100:260, 120:190] = 300  # beyond uint8: a lookup table over uint16
    tifffile.imwrite(tmp_path / "l.tif", labels, tile=(64, 64), compression="zlib")
    with open_mask(tmp_path / "l.tif", values=(300,), allowed=(7,)) as mask:
        bands = np.concatenate([b for _, b in mask.iter_bands(70)])
        np.testing.assert_array_equal(bands, labels == 300)
        counts = np.concatenate([c for _, c in mask.iter_block_sums(8)])
        assert counts.sum() == 160 * 70 == block_sums(labels == 300, 8).sum()
    np.save(tmp_path / "l.npy", labels.astype(np.int32) - 1)  # -1 everywhere else: refused
    with pytest.raises(UnshortcutError, match=r"values -1, 6, 299 fit no known mask encoding"):
        open_mask(tmp_path / "l.npy", values=(299,), allowed=(6,))
    np.save(tmp_path / "i.npy", labels.astype(np.int32))
    with open_mask(tmp_path / "i.npy", values=(7,), allowed=(300,)) as mask:  # np.isin path
        np.testing.assert_array_equal(mask.read_region(0, 0, 300, 200), labels == 7)
    Image.fromarray(np.stack([labels.astype(np.uint8)] * 3, axis=-1)).save(tmp_path / "rgb.png")
    with pytest.raises(UnshortcutError, match=r"label map must have one channel of integers"):
        open_mask(tmp_path / "rgb.png", values=(7,))


def test_jpeg_mask_is_no_label_map(tmp_path: Path) -> None:
    truth = np.zeros((64, 64), np.uint8)
    truth[13:45, 5:37] = 255
    Image.fromarray(truth).save(tmp_path / "m.jpg", quality=60)
    with pytest.raises(UnshortcutError, match=r"m\.jpg: values 0, 1, 2, .* distinct\) fit no"):
        open_mask(tmp_path / "m.jpg", values=(255,))


# --- lower resolution --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "mask", "scale"),
    [
        ((1500, 664), (375, 166), 4),
        ((100, 101), (25, 25), 4),  # 101 / 4 = 25.25: within a mask pixel
        ((100, 100), (34, 34), 3),  # 100 / 3 = 33.3, rounded up
        ((32, 40), (32, 40), 1),
        ((100, 100), (40, 40), None),  # 2.5: no integer scale
        ((32, 40), (32, 41), None),
        ((100, 200), (25, 25), None),  # another aspect ratio
    ],
)
def test_mask_scale(image: tuple, mask: tuple, scale: int | None) -> None:
    assert mask_scale(image, mask) == scale


def test_scaled_mask_is_nearest_upsampling(tmp_path: Path) -> None:
    small = RNG.random((13, 11)) > 0.6
    Image.fromarray(small.astype(np.uint8) * 255).save(tmp_path / "s.png")
    shape = (51, 45)  # 13 * 4 = 52 rows cut to 51; 11 * 4 = 44 columns, the last repeated
    big = np.repeat(np.repeat(small, 4, axis=0), 4, axis=1)[:51]
    big = np.concatenate([big, big[:, -1:]], axis=1)
    with ScaledMask(open_mask(tmp_path / "s.png"), 4, shape) as mask:
        assert mask.shape == shape
        np.testing.assert_array_equal(mask.read_region(0, 0, *shape), big)
        np.testing.assert_array_equal(mask.read_region(5, 39, 20, 6), big[5:25, 39:45])
        np.testing.assert_array_equal(np.concatenate([b for _, b in mask.iter_bands(7)]), big)
        # Block sides that share 4, 2 or nothing with the scale, and a row limit.
        for factor, rows in [(1, None), (2, None), (4, None), (8, None), (3, None), (6, 5)]:
            chunks = list(mask.iter_block_sums(factor, rows))
            counts = np.concatenate([c for _, c in chunks])
            np.testing.assert_array_equal(counts, block_sums(big, factor, rows))
        with pytest.raises(UnshortcutError, match="leaves the image"):
            mask.read_region(50, 0, 2, 1)
