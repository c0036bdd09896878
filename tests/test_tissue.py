"""Tissue detection, exact tissue fractions, thumbnails and precomputed tissue masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from unshortcut.errors import UnshortcutError
from unshortcut.io.readers import open_image
from unshortcut.tiling.tissue import (
    TissueMask,
    detect_tissue_from_thumbnail,
    thumbnail_of,
    tissue_from_mask_file,
)


def brute_force_fractions(
    values: np.ndarray, downsample: float, ys: np.ndarray, xs: np.ndarray, size: float
) -> np.ndarray:
    """Overlap area of each square with every mask pixel, summed (no summed-area table)."""
    edges_y = np.arange(values.shape[0] + 1) * downsample
    edges_x = np.arange(values.shape[1] + 1) * downsample
    over_y = np.clip(
        np.minimum(ys[:, None] + size, edges_y[None, 1:])
        - np.maximum(ys[:, None], edges_y[None, :-1]),
        0,
        None,
    )
    over_x = np.clip(
        np.minimum(xs[:, None] + size, edges_x[None, 1:])
        - np.maximum(xs[:, None], edges_x[None, :-1]),
        0,
        None,
    )
    return np.einsum("ni,ij,nj->n", over_y, values.astype(float), over_x) / size**2


@pytest.mark.parametrize("downsample", [1.0, 4.0, 2.5, 3.7])
def test_fractions_match_brute_force(downsample: float) -> None:
    rng = np.random.default_rng(int(downsample * 10))
    mask = rng.random((23, 31)) > 0.5
    tissue = TissueMask(mask, downsample)
    height, width = mask.shape[0] * downsample, mask.shape[1] * downsample
    for size in [1.0, 3.0, 7.5, 16.0, 40.0]:
        ys = rng.uniform(-size / 2, height - size / 2, 200)
        xs = rng.uniform(-size / 2, width - size / 2, 200)
        expected = brute_force_fractions(mask, downsample, ys, xs, size)
        np.testing.assert_allclose(tissue.fractions(ys, xs, size), expected, atol=1e-9)


def test_fractions_hand_computed() -> None:
    mask = np.array([[1, 0], [0, 0]], bool)
    tissue = TissueMask(mask, 2.0)  # mask pixel (0, 0) covers full-res [0, 2) x [0, 2)
    np.testing.assert_allclose(
        tissue.fractions([0, 1, 0, 2], [0, 1, 1, 2], 2), [1.0, 0.25, 0.5, 0.0]
    )
    full = np.random.default_rng(1).random((40, 50)) > 0.3
    ys, xs = np.array([0, 5, 17]), np.array([3, 0, 30])
    got = TissueMask(full, 1.0).fractions(ys, xs, 8)
    np.testing.assert_allclose(
        got, [full[y : y + 8, x : x + 8].mean() for y, x in zip(ys, xs, strict=True)]
    )


def test_fractions_use_coverage() -> None:
    coverage = np.array([[0.25, 1.0]])
    tissue = TissueMask(coverage >= 0.5, 4.0, coverage=coverage)
    np.testing.assert_allclose(tissue.fractions([0], [0], 4), [0.25])
    np.testing.assert_allclose(tissue.fractions([0], [2], 4), [0.625])


def blob_image(dark_background: bool, channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured elliptical tissue blob with one small fragment, and its true mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:200, :260]
    truth = ((yy - 95) / 60) ** 2 + ((xx - 120) / 85) ** 2 <= 1
    truth |= (yy - 170) ** 2 + (xx - 230) ** 2 <= 12**2
    if dark_background:
        background = rng.normal(8, 3, (200, 260, channels))
        tissue = rng.gamma(4, 25, (200, 260, channels)) + 40
    else:
        background = rng.normal(235, 4, (200, 260, channels))
        tissue = rng.normal([150, 90, 170][:channels], 30, (200, 260, channels))
    image = np.where(truth[..., None], tissue, background)
    return np.clip(image, 0, 255).astype(np.uint8 if not dark_background else np.float32), truth


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize(("dark", "channels"), [(False, 3), (True, 5)])
def test_polarity_auto_recovers_blob(dark: bool, channels: int) -> None:
    image, truth = blob_image(dark, channels, seed=3)
    tissue = detect_tissue_from_thumbnail(image, 16.0)
    assert tissue.polarity == ("dark-background" if dark else "bright-background")
    assert iou(tissue.mask, truth) > 0.9
    assert tissue.downsample == 16.0
    forced = detect_tissue_from_thumbnail(
        image, 16.0, polarity="bright-background" if dark else "dark-background"
    )
    assert iou(forced.mask, truth) < 0.1


def test_clean_up_removes_specks_and_fills_holes() -> None:
    image, _ = blob_image(False, 3, seed=4)
    image[20:22, 20:22] = 60  # a 2 x 2 thumbnail-pixel speck on glass
    image[90:92, 120:122] = 235  # a 2 x 2 hole in the tissue
    tissue = detect_tissue_from_thumbnail(image, 10.0, min_object_px=40.0, closing_radius=0)
    assert not tissue.mask[20:22, 20:22].any() and tissue.mask[90:92, 120:122].all()
    kept = detect_tissue_from_thumbnail(image, 10.0, min_object_px=0.0, closing_radius=0)
    assert kept.mask[20:22, 20:22].all()


def test_fixed_threshold_and_bad_options() -> None:
    image, truth = blob_image(False, 3, seed=5)
    tissue = detect_tissue_from_thumbnail(
        image, 1.0, method="threshold", threshold=0.6, min_object_px=0
    )
    assert iou(tissue.mask, truth) > 0.9 and tissue.threshold == 0.6
    with pytest.raises(UnshortcutError, match="tissue threshold"):
        detect_tissue_from_thumbnail(image, 1.0, method="threshold")
    with pytest.raises(UnshortcutError, match="tissue polarity"):
        detect_tissue_from_thumbnail(image, 1.0, polarity="sideways")  # type: ignore[arg-type]


def test_fixed_threshold_holds_on_tissue_filled_images() -> None:
    """No glass anywhere: Otsu calls it all tissue, a fixed threshold still cuts out the
    white lumen, and its side of 0.5 says which side is background under auto."""
    rng = np.random.default_rng(2)
    tile = rng.normal((190, 120, 170), 18, (64, 64, 3))
    lumen = np.zeros((64, 64), bool)
    lumen[16:32, 16:40] = True
    tile[lumen] = rng.normal(238, 4, (int(lumen.sum()), 3))
    tile = np.clip(tile, 0, 255).astype(np.uint8)
    plain = detect_tissue_from_thumbnail(tile[:, 40:], 1.0, min_object_px=0)  # no lumen
    assert plain.polarity == "none" and plain.mask.all()
    fixed = detect_tissue_from_thumbnail(
        tile, 1.0, method="threshold", threshold=0.8, min_object_px=0, closing_radius=0
    )
    assert fixed.polarity == "bright-background" and fixed.threshold == 0.8
    assert iou(~fixed.mask, lumen) > 0.95
    low = detect_tissue_from_thumbnail(tile, 1.0, method="threshold", threshold=0.2)
    assert low.polarity == "dark-background"


def test_no_background_means_all_tissue(shared_data: Path) -> None:
    reader = open_image(shared_data / "bcss/images/1015.jpg")
    thumb, downsample = thumbnail_of(reader, 512)
    tissue = detect_tissue_from_thumbnail(thumb, downsample)
    assert tissue.polarity == "none" and tissue.mask.all()
    slide = open_image(shared_data / "camelyon16/images/Tumor_004.png")
    thumb, downsample = thumbnail_of(slide, 512)
    tissue = detect_tissue_from_thumbnail(thumb, downsample)
    assert downsample == 3.0 and tissue.polarity == "bright-background"
    assert 0.05 < tissue.mask.mean() < 0.2
    assert not tissue.mask[:5].any()  # the glass along the top edge


def test_thumbnail_uses_pyramid_level_or_block_mean(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    data = rng.integers(0, 60000, (300, 200, 2), dtype=np.uint16)
    small = data[::4, ::4]
    with tifffile.TiffWriter(tmp_path / "p.tif") as tif:
        tif.write(data, tile=(64, 64), subifds=1, photometric="minisblack", planarconfig="contig")
        tif.write(
            small, tile=(64, 64), subfiletype=1, photometric="minisblack", planarconfig="contig"
        )
    thumb, downsample = thumbnail_of(open_image(tmp_path / "p.tif"), max_side=100)
    assert downsample == 4.0
    np.testing.assert_array_equal(thumb, small.astype(np.float32))

    np.save(tmp_path / "a.npy", data)
    thumb, downsample = thumbnail_of(open_image(tmp_path / "a.npy"), max_side=100)
    assert downsample == 3.0 and thumb.shape == (100, 67, 2)
    np.testing.assert_allclose(thumb[5, 7], data[15:18, 21:24].reshape(-1, 2).mean(0), rtol=1e-6)
    np.testing.assert_allclose(
        thumb[99, 66], data[297:300, 198:200].reshape(-1, 2).mean(0), rtol=1e-6
    )


def test_tissue_from_mask_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    full = rng.random((64, 48)) > 0.4
    Image.fromarray(full.astype(np.uint8) * 255).save(tmp_path / "t.png")
    tissue = tissue_from_mask_file(tmp_path / "t.png", (64, 48), downsample=4)
    assert tissue.downsample == 4 and tissue.mask.shape == (16, 12)
    np.testing.assert_allclose(tissue.coverage, full.reshape(16, 4, 12, 4).mean(axis=(1, 3)))
    ys, xs = np.array([0, 8, 40]), np.array([4, 20, 28])
    expected = [full[y : y + 16, x : x + 16].mean() for y, x in zip(ys, xs, strict=True)]
    np.testing.assert_allclose(tissue.fractions(ys, xs, 16), expected)

    Image.fromarray(full.astype(np.uint8)).save(tmp_path / "low.png")  # a 0/1 mask, 1/8 scale
    low = tissue_from_mask_file(tmp_path / "low.png", (512, 384), downsample=8)
    assert low.downsample == 8 and low.coverage is None
    np.testing.assert_array_equal(low.mask, full)
    with pytest.raises(
        UnshortcutError, match=r"t\.png: size 48 x 64 does not match image 100 x 64"
    ):
        tissue_from_mask_file(tmp_path / "t.png", (64, 100), downsample=4)
