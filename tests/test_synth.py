"""Tests of the synthetic data generator: files, determinism, and the planted shortcut."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from scipy.ndimage import distance_transform_edt
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from unshortcut.cli import app
from unshortcut.errors import UnshortcutError
from unshortcut.synth import (
    RECOMMENDED_PATCHIFY,
    generate_dataset,
    make_config,
    plan_dataset,
    synthesize_image,
)
from unshortcut.synth.layouts import painted_geometry, read_layout
from unshortcut.synth.noise import value_noise

SMALL = {"images": 2, "size": 512, "tumor_size": 70.0, "tumor_prevalence": 1.0}


def _patch_table(tissue: np.ndarray, tumor: np.ndarray, size: int = 64):
    """Per-patch tissue ratio, tumor fraction and any-tumor label on a regular grid."""
    h, w = (tissue.shape[0] // size) * size, (tissue.shape[1] // size) * size

    def blocks(a: np.ndarray) -> np.ndarray:
        return a[:h, :w].reshape(h // size, size, w // size, size).swapaxes(1, 2)

    ratio = blocks(tissue).mean(axis=(2, 3)).ravel()
    tumor_fraction = blocks(tumor).mean(axis=(2, 3)).ravel()
    return ratio, tumor_fraction, tumor_fraction > 0


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_identical_files_serial_and_parallel(tmp_path: Path) -> None:
    config = make_config(**SMALL, write_tissue=True)
    generate_dataset(config, tmp_path / "a", show_progress=False)
    generate_dataset(config, tmp_path / "b", workers=2, show_progress=False)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(a) == [
        "images/synth_000.tif",
        "images/synth_001.tif",
        "masks/synth_000.png",
        "masks/synth_001.png",
        "metadata.csv",
        "synth.json",
        "tissue/synth_000.png",
        "tissue/synth_001.png",
    ]
    assert a == b
    generate_dataset(make_config(**SMALL, seed=1), tmp_path / "c", show_progress=False)
    assert (tmp_path / "c" / "images" / "synth_000.tif").read_bytes() != a["images/synth_000.tif"]


def test_written_files_match_in_memory_render(tmp_path: Path) -> None:
    config = make_config(**SMALL, write_tissue=True)
    generate_dataset(config, tmp_path / "d", show_progress=False)
    rendered = synthesize_image(config, 1)
    image = tifffile.imread(tmp_path / "d" / "images" / "synth_001.tif")
    mask = np.asarray(Image.open(tmp_path / "d" / "masks" / "synth_001.png"))
    tissue = np.asarray(Image.open(tmp_path / "d" / "tissue" / "synth_001.png"))
    np.testing.assert_array_equal(image, rendered.image)
    np.testing.assert_array_equal(mask, rendered.tumor * 255)
    np.testing.assert_array_equal(tissue, rendered.tissue * 255)
    assert set(np.unique(mask)) <= {0, 255}
    assert not (mask.astype(bool) & ~tissue.astype(bool)).any()
    assert mask.any()


@pytest.mark.parametrize(("channels", "dtype"), [(3, "uint8"), (4, "uint16"), (1, "uint8")])
def test_shapes_dtypes_and_tiling(tmp_path: Path, channels: int, dtype: str) -> None:
    config = make_config(**{**SMALL, "images": 1}, channels=channels, dtype=dtype)
    generate_dataset(config, tmp_path / "d", show_progress=False)
    with tifffile.TiffFile(tmp_path / "d" / "images" / "synth_000.tif") as tif:
        page = tif.pages[0]
        expected = (512, 512, channels) if channels > 1 else (512, 512)
        assert page.shape == expected
        assert page.dtype == np.dtype(dtype)
        assert page.is_tiled and page.tilewidth == 256
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        pixels = page.asarray()
    # dark background, brighter tissue in the first channel
    rendered = synthesize_image(config, 0)
    first = pixels if channels == 1 else pixels[..., 0]
    assert first[~rendered.tissue].mean() < 0.5 * first[rendered.tissue].mean()
    record = json.loads((tmp_path / "d" / "synth.json").read_text())
    assert (
        record["patchify"]
        == RECOMMENDED_PATCHIFY
        == {
            "patch_size": 64,
            "input_size": 32,
            "stride": 64,
        }
    )
    assert record["config"]["channels"] == channels
    assert len(record["channels"]) == channels


def test_metadata_columns_patients_and_split(tmp_path: Path) -> None:
    config = make_config(images=5, size=256, images_per_patient=2, sites=3, write_split=True)
    generate_dataset(config, tmp_path / "d", show_progress=False)
    table = pd.read_csv(tmp_path / "d" / "metadata.csv")
    assert list(table.columns) == ["image_id", "patient_id", "site", "split"]
    assert list(table["image_id"]) == [f"synth_{i:03d}" for i in range(5)]
    assert list(table["patient_id"]) == ["patient_000"] * 2 + ["patient_001"] * 2 + ["patient_002"]
    assert table.groupby("patient_id")["split"].nunique().max() == 1
    assert table.groupby("patient_id")["site"].nunique().max() == 1
    assert set(table["site"]) <= {"site_0", "site_1", "site_2"}
    plain = make_config(images=2, size=256)
    assert "split" not in plan_dataset(plain)[0].metadata()


def test_site_label_correlation_one_sends_tumor_patients_to_site_zero() -> None:
    plans = plan_dataset(make_config(images=16, size=256, site_label_correlation=1.0, sites=3))
    for plan in plans:
        patient_tumor = any(p.has_tumor for p in plans if p.patient_id == plan.patient_id)
        assert plan.site == (0 if patient_tumor else 2)
    assert sum(p.has_tumor for p in plans) == 12  # round(0.75 * 16)


def test_tissue_ratio_shortcut_emerges_with_both_minority_groups() -> None:
    config = make_config(images=4, size=1024, tumor_size=120.0, tumor_prevalence=1.0)
    ratios, labels = [], []
    for index in range(config.images):
        image = synthesize_image(config, index)
        ratio, _, label = _patch_table(image.tissue, image.tumor)
        keep = ratio > 0
        ratios.append(ratio[keep])
        labels.append(label[keep])
    ratio, label = np.concatenate(ratios), np.concatenate(labels)
    auroc = roc_auc_score(label, ratio)
    assert auroc > 0.65
    assert np.count_nonzero(label & (ratio < 0.5)) >= 15  # tumor with little tissue
    assert np.count_nonzero(~label & (ratio >= 0.5)) >= 15  # normal with much tissue


def _texture_statistics(tumor_signal: float) -> tuple[float, float, float, float]:
    """Dark-TPEF share and SHG mean of pure tumor and pure normal tissue patches.

    Darkness is judged against each patch's own median, so slow illumination and
    brightness differences between images do not count as nuclei.
    """
    config = make_config(
        images=2,
        size=1024,
        tumor_size=150.0,
        tumor_prevalence=1.0,
        site_shift=0.0,
        tumor_signal=tumor_signal,
    )
    dark = {True: [], False: []}
    shg = {True: [], False: []}
    for index in range(config.images):
        image = synthesize_image(config, index)
        tpef = image.image[..., 1].astype(np.float32)
        for y in range(0, 1024, 64):
            for x in range(0, 1024, 64):
                tissue = image.tissue[y : y + 64, x : x + 64]
                tumor = image.tumor[y : y + 64, x : x + 64]
                if tissue.mean() < 0.9 or 0 < tumor.mean() < 0.95:
                    continue
                is_tumor = bool(tumor.any())
                values = tpef[y : y + 64, x : x + 64][tissue]  # nuclei: dark TPEF spots
                dark[is_tumor].append((values < 0.6 * np.median(values)).mean())
                shg[is_tumor].append(image.image[y : y + 64, x : x + 64, 2][tissue].mean())
    assert min(len(dark[True]), len(dark[False])) >= 10
    return (
        float(np.mean(dark[True])),
        float(np.mean(dark[False])),
        float(np.mean(shg[True])),
        float(np.mean(shg[False])),
    )


def test_tumor_signal_zero_matches_and_one_differs() -> None:
    dark_t, dark_n, shg_t, shg_n = _texture_statistics(0.0)
    assert abs(dark_t - dark_n) < 0.15 * dark_n
    assert abs(shg_t - shg_n) < 0.3 * shg_n
    dark_t1, dark_n1, shg_t1, shg_n1 = _texture_statistics(1.0)
    assert dark_t1 > 1.5 * dark_n1  # more and larger nuclei
    # geometry does not depend on the signal, so the same patches compare directly
    assert dark_n1 == pytest.approx(dark_n, rel=0.02)
    assert shg_n1 == pytest.approx(shg_n, rel=0.02)
    assert shg_t1 < 0.8 * shg_t  # collagen sparse in tumor


def test_layouts_reproduce_tumor_and_tissue_fractions(shared_data: Path) -> None:
    folder = shared_data / "camelyon17-layouts"
    config = make_config(images=100, size=768, layouts=folder, write_split=False)
    plans = plan_dataset(config)
    assert all(p.patient_id.startswith("patient_") for p in plans)
    fractions = [(read_layout(p.layout) == 2).mean() for p in plans]
    index = int(np.argmax(np.array(fractions) > 0.02))
    labels = read_layout(plans[index].layout)
    image = synthesize_image(config, index)
    scale = 768 / max(labels.shape)
    assert image.image.shape[:2] == (round(labels.shape[0] * scale), round(labels.shape[1] * scale))
    assert image.tumor.mean() == pytest.approx((labels == 2).mean(), rel=0.25)
    assert image.tissue.mean() == pytest.approx((labels >= 1).mean(), rel=0.35)
    assert not (image.tumor & ~image.tissue).any()


def _painted(labels: np.ndarray, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tissue, tumor) masks of a layout painted at ``size``, before gaps are carved."""
    geometry = painted_geometry(labels, size, seed, make_config().border_roughness)
    ys, xs = (np.arange(n, dtype=np.float64) for n in geometry.shape)
    tissue, tumor = geometry.base(ys, xs)
    return tissue > 0, tumor > 0


def test_painted_layout_without_tumor_has_no_tumor(shared_data: Path) -> None:
    labels = read_layout(shared_data / "camelyon17-layouts" / "patient_000_node_4_mask.png")
    assert not (labels == 2).any()
    tissue, tumor = _painted(labels, 1024)
    assert not tumor.any()
    assert tissue.mean() == pytest.approx((labels >= 1).mean(), rel=0.1)


@pytest.mark.parametrize("size", [512, 2048])
@pytest.mark.parametrize("name", ["patient_096_node_0", "patient_044_node_4"])
def test_painted_layout_keeps_area_fractions(shared_data: Path, name: str, size: int) -> None:
    labels = read_layout(shared_data / "camelyon17-layouts" / f"{name}_mask.png")
    tissue, tumor = _painted(labels, size)
    assert tissue.mean() == pytest.approx((labels >= 1).mean(), rel=0.1)
    assert tumor.mean() == pytest.approx((labels == 2).mean(), rel=0.1)
    assert not (tumor & ~tissue).any()


def test_painted_border_moves_less_than_half_a_cell() -> None:
    # 10 x 10 cells of 40 px; tumor reaches the glass on the left and top
    labels = np.zeros((10, 10), dtype=np.uint8)
    labels[1:8, 1:9] = 1
    labels[1:4, 1:5] = 2
    labels[6, 7] = 2  # a one-cell tumor
    tissue, tumor = _painted(labels, 400, seed=3)
    cells = labels[np.ix_(np.arange(400) // 40, np.arange(400) // 40)]
    for painted, upscaled in ((tissue, cells >= 1), (tumor, cells == 2)):
        np.testing.assert_array_equal(painted[20::40, 20::40], upscaled[20::40, 20::40])
        inside = distance_transform_edt(upscaled)
        outside = distance_transform_edt(~upscaled)
        moved = painted != upscaled
        assert moved.mean() > 0.02  # the staircase is rounded and roughened...
        # ...within 0.4 cell (no two cells here touch only at a corner, where it may be more)
        assert np.maximum(inside, outside)[moved].max() <= 0.4 * 40 + 1
    assert not (tumor & ~tissue).any()


def test_painted_geometry_does_not_depend_on_the_window() -> None:
    labels = np.ones((12, 9), dtype=np.uint8)
    labels[0, :] = 0
    labels[4:8, 2:6] = 2
    geometry = painted_geometry(labels, 600, seed=1, roughness=0.35)
    ys, xs = np.arange(-20.0, 620.0), np.arange(-20.0, 470.0)
    whole = geometry.base(ys, xs)
    part = geometry.base(ys[150:410], xs[90:333])
    for a, b in zip(whole, part, strict=True):
        np.testing.assert_allclose(b, a[150:410, 90:333], atol=1e-4)


def test_value_noise_does_not_depend_on_the_window() -> None:
    ys, xs = np.arange(0.0, 300.0), np.arange(-50.0, 250.0)
    whole = value_noise(ys, xs, 13.0, seed=5)
    part = value_noise(ys[100:220], xs[40:260], 13.0, seed=5)
    np.testing.assert_allclose(part, whole[100:220, 40:260], atol=1e-5)
    big = value_noise(np.arange(0.0, 2000.0), np.arange(0.0, 2000.0), 20.0, seed=1)
    assert big.std() == pytest.approx(1.0, abs=0.1)


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(UnshortcutError, match="--size"):
        make_config(size=100)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UnshortcutError, match=r"no \.png layout"):
        plan_dataset(make_config(layouts=empty))
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(bad / "x.png")
    with pytest.raises(UnshortcutError, match="0 glass, 1 tissue, 2 tumor"):
        plan_dataset(make_config(layouts=bad))
    runner = CliRunner()
    result = runner.invoke(app, ["synth", str(tmp_path / "o"), "--layouts", str(tmp_path / "no")])
    assert result.exit_code == 2
    assert "not a folder" in result.output
    result = runner.invoke(app, ["synth", str(tmp_path / "o"), "--size", "64"])
    assert result.exit_code == 2 and "--size" in result.output
    assert not (tmp_path / "o").exists()


def test_cli_writes_dataset(tmp_path: Path) -> None:
    out = tmp_path / "data"
    args = ["synth", str(out), "--images", "1", "--size", "256", "--write-tissue"]
    result = CliRunner().invoke(app, [*args, "--normal-hole-fraction", "0.5"])
    assert result.exit_code == 0, result.output
    assert (out / "tissue" / "synth_000.png").is_file()
    record = json.loads((out / "synth.json").read_text())
    assert record["config"]["normal_hole_fraction"] == 0.5
    assert record["config"]["tumor_area"] == make_config().tumor_area  # unset knob: default
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output


def test_large_images_get_tiled_tiff_masks(tmp_path: Path, monkeypatch) -> None:
    import unshortcut.synth.generate as generate

    monkeypatch.setattr(generate, "PNG_MAX_SIDE", 256)
    config = make_config(**{**SMALL, "images": 1}, write_tissue=True)
    generate_dataset(config, tmp_path / "d", show_progress=False)
    mask = tifffile.imread(tmp_path / "d" / "masks" / "synth_000.tif")
    tissue = tifffile.imread(tmp_path / "d" / "tissue" / "synth_000.tif")
    rendered = synthesize_image(config, 0)
    np.testing.assert_array_equal(mask, rendered.tumor * 255)
    np.testing.assert_array_equal(tissue, rendered.tissue * 255)
