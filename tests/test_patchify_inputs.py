"""`patchify` on inputs as real data comes: polygons, tumor-free slides without a mask,
thumbnail-size masks, label maps with several classes, tiles filled with tissue."""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from PIL import Image
from skimage.measure import find_contours
from typer.testing import CliRunner

from unshortcut.cli import app
from unshortcut.tiling.patchify import PatchifyConfig, patchify
from unshortcut.tiling.patchset import PatchSet

runner = CliRunner()
RNG = np.random.default_rng(5)

# Tumor of the 64 x 60 test image, level-0 pixels (x column, y row): a lobe with a hole.
LOBE = [(5.3, 4.2), (50.6, 9.1), (44.2, 40.7), (12.8, 47.3)]
HOLE = [(20.2, 18.4), (32.7, 17.9), (30.1, 30.6)]


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def invoke(*args: str):
    return runner.invoke(app, ["patchify", *args])


def image(root: Path, image_id: str, shape: tuple[int, int] = (60, 64)) -> None:
    save(root / "images" / f"{image_id}.png", RNG.integers(0, 200, (*shape, 3), dtype=np.uint8))


def tumor_truth(shape: tuple[int, int] = (60, 64)) -> np.ndarray:
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    return shapely.contains_xy(shapely.Polygon(LOBE, [HOLE]), cols + 0.5, rows + 0.5)


def geojson(root: Path, image_id: str) -> None:
    polygon = {"type": "Polygon", "coordinates": [[*LOBE, LOBE[0]], [*HOLE, HOLE[0]]]}
    properties = {"classification": {"name": "Tumor"}}
    document = {"type": "Feature", "geometry": polygon, "properties": properties}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"{image_id}.geojson").write_text(json.dumps(document))


def asap(root: Path, image_id: str) -> None:
    """The same region as CAMELYON16 draws it: a _0 lobe and a _2 exclusion for the hole."""

    def annotation(group: str, points: list) -> str:
        coords = "".join(
            f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(points)
        )
        coordinates = f"<Coordinates>{coords}</Coordinates>"
        return f'<Annotation Type="Polygon" PartOfGroup="{group}">{coordinates}</Annotation>'

    text = f"<ASAP_Annotations><Annotations>{annotation('_0', LOBE)}{annotation('_2', HOLE)}"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"{image_id}.xml").write_text(
        text + "</Annotations></ASAP_Annotations>"
    )


# --- annotations -------------------------------------------------------------------------


@pytest.mark.parametrize(("patch_size", "input_size"), [(8, 4), (12, 5)])
def test_annotations_give_the_raster_masks_patches(
    tmp_path: Path, patch_size: int, input_size: int
) -> None:
    """GeoJSON and ASAP XML polygons label patches exactly like the raster mask drawn
    from them (pixel-centre rule), on the block-sum path and the resize path."""
    raster, polygons = tmp_path / "raster", tmp_path / "polygons"
    for image_id in ("g", "x"):
        for root in (raster, polygons):
            image(root, image_id)
        save(raster / "masks" / f"{image_id}.png", tumor_truth().astype(np.uint8) * 255)
    geojson(polygons, "g")
    asap(polygons, "x")
    annotations = polygons / "annotations"
    (annotations / "g.geojson").rename(annotations / "g.tif.geojson")  # QuPath's naming
    config = PatchifyConfig(patch_size=patch_size, input_size=input_size, min_tissue=0)
    expected = patchify(raster, tmp_path / "r", config)
    result = patchify(polygons, tmp_path / "p", config)
    columns = ["patch_id", "tumor_fraction", "label", "tissue_ratio"]
    pd.testing.assert_frame_equal(result.table[columns], expected.table[columns])
    store, reference = PatchSet.open(tmp_path / "p"), PatchSet.open(tmp_path / "r")
    np.testing.assert_array_equal(store.masks[:], reference.masks[:])
    # One patch by hand: its tumor fraction is the share of pixel centres in the region.
    fractions = result.table.set_index("patch_id")["tumor_fraction"]
    window = tumor_truth()[patch_size : 2 * patch_size, patch_size : 2 * patch_size]
    assert fractions[f"g@{patch_size},{patch_size}"] == window.mean() > 0
    sources = result.manifest["images"]
    assert sources["g"]["tumor_source"] == "annotation g.tif.geojson: 1 tumor; classes Tumor (1)"
    assert (
        sources["x"]["tumor_source"]
        == "annotation x.xml: 1 exclude, 1 tumor; classes _0 (1), _2 (1)"
    )
    assert result.manifest["parameters"]["tumor_classes"] == ["Tumor", "metastases", "_0", "_1"]


def test_mask_and_annotation_for_one_image_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "data"
    image(root, "a")
    save(root / "masks" / "a.png", tumor_truth().astype(np.uint8))
    geojson(root, "a")
    result = invoke(str(root), str(tmp_path / "out"), "--patch-size", "8", "--input-size", "4")
    assert result.exit_code == 2
    assert "error: images/a.png: has both masks/a.png and annotations/a.geojson; keep one" in (
        result.output
    )
    assert not (tmp_path / "out").exists()


# --- slides without a mask ---------------------------------------------------------------


def test_missing_mask_negative_only_when_asked(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for image_id in ("a", "b", "c"):
        image(root, image_id)
    save(root / "masks" / "a.png", tumor_truth().astype(np.uint8))
    args = [str(root), str(tmp_path / "out"), "--patch-size", "8", "--input-size", "4",
            "--min-tissue", "0"]  # fmt: skip
    refused = invoke(*args)
    assert refused.exit_code == 2 and not (tmp_path / "out").exists()
    assert (
        "error: images/b.png: no mask in masks/ or annotation in annotations/ (for tumor-free"
        in (" ".join(refused.output.split()))
    )
    accepted = invoke(*args, "--missing-mask", "negative")
    assert accepted.exit_code == 0, accepted.output
    assert (
        "warning: 2 image(s) without a mask or annotation count as tumor-free "
        "(--missing-mask negative): b, c"
    ) in " ".join(accepted.output.split())
    patches = PatchSet.open(tmp_path / "out")
    table = patches.table
    tumor_patches = int(tumor_truth()[:56].reshape(7, 8, 8, 8).any(axis=(1, 3)).sum())
    assert tumor_patches == 34
    assert table.groupby("image_id")["label"].sum().to_dict() == {"a": 34, "b": 0, "c": 0}
    assert len(table) == 3 * 7 * 8
    assert not patches.masks[(table["image_id"] != "a").to_numpy()].any()
    manifest = patches.manifest
    assert manifest["parameters"]["missing_mask"] == "negative"
    assert manifest["images"]["b"]["tumor_source"] == "none: tumor-free"
    # Without masks/ at all, every image is negative.
    (root / "masks" / "a.png").unlink()
    (root / "masks").rmdir()
    config = PatchifyConfig(patch_size=8, input_size=4, min_tissue=0, missing_mask="negative")
    assert patchify(root, tmp_path / "none", config).table["label"].sum() == 0


# --- lower-resolution masks --------------------------------------------------------------


def test_low_resolution_mask_is_scaled_to_the_image(tmp_path: Path) -> None:
    small = np.zeros((15, 15), np.uint8)  # a 1/4 export of a 62 x 62 image (15 * 4 = 60)
    small[2:9, 3:11] = 255
    small[14, 14] = 255  # the last mask pixel, stretched over the image's last 6 x 6 pixels
    full = np.pad(np.kron(small, np.ones((4, 4), np.uint8)), ((0, 2), (0, 2)), mode="edge")
    low, high = tmp_path / "low", tmp_path / "high"
    for root, mask in ((low, small), (high, full)):
        image(root, "a", (62, 62))
        save(root / "masks" / "a.png", mask)
    config = PatchifyConfig(patch_size=2, input_size=1, min_tissue=0)
    expected = patchify(high, tmp_path / "h", config).table
    table = patchify(low, tmp_path / "l", config).table
    pd.testing.assert_series_equal(table["tumor_fraction"], expected["tumor_fraction"])
    assert len(table) == 31 * 31 and table["label"].sum() == (7 * 2) * (8 * 2) + 3 * 3
    assert table.set_index("patch_id").loc["a@60,60", "label"] == 1
    manifest = json.loads((tmp_path / "l" / "manifest.json").read_text())
    assert (
        manifest["images"]["a"]["tumor_source"]
        == "mask a.png (binary, foreground > 127, 1/4 scale)"
    )
    save(low / "masks" / "a.png", np.zeros((24, 25), np.uint8))  # 2.5x: refused
    result = invoke(str(low), str(tmp_path / "out"), "--patch-size", "6", "--input-size", "3")
    assert result.exit_code == 2
    assert (
        "error: masks/a.png: size 25 x 24 (width x height) fits images/a.png (62 x 62) at no "
        "integer scale"
    ) in " ".join(result.output.split())


# --- label maps: the CAMELYON17 layouts --------------------------------------------------

LAYOUT_SCALE = 8
"""Image pixels per layout cell in the painted layouts (a cell is one 256 px tile of the
real slide; 8 keeps the test small)."""


def painted_layouts(shared_data: Path, root: Path, count: int) -> dict[str, np.ndarray]:
    """Images painted from CAMELYON17 label maps (glass bright, tissue and tumor darker),
    with the label map itself, at 1/8 of the image size, as the mask."""
    layouts = sorted((shared_data / "camelyon17-layouts").glob("*.png"))
    chosen = [p for p in layouts if (np.asarray(Image.open(p)) == 2).any()][:count]
    labels = {}
    for path in chosen:
        image_id = path.stem.removesuffix("_mask")
        label_map = np.asarray(Image.open(path))
        grey = np.array([235, 160, 120], np.uint8)[label_map]
        painted = np.kron(grey, np.ones((LAYOUT_SCALE, LAYOUT_SCALE), np.uint8))
        save(root / "images" / f"{image_id}.png", painted)
        save(root / "masks" / f"{image_id}.png", label_map)
        labels[image_id] = label_map
    return labels


@pytest.mark.slow
def test_camelyon17_label_maps(shared_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    labels = painted_layouts(shared_data, root, 4)
    args = [str(root), str(tmp_path / "out"), "--patch-size", "16", "--input-size", "4",
            "--min-tissue", "0"]  # fmt: skip
    refused = invoke(*args)
    assert refused.exit_code == 2
    first = sorted(labels)[0]
    assert f"masks/{first}.png: values 0, 1, 2 fit no known mask encoding" in (
        " ".join(refused.output.split())
    )
    assert invoke(*args, "--tumor-values", "2").exit_code == 2  # tissue (1) not declared
    result = invoke(*args, "--tumor-values", "2", "--tissue-values", "1,2")
    assert result.exit_code == 0, result.output
    table = PatchSet.open(tmp_path / "out").table
    for image_id, label_map in labels.items():
        # A 16 px patch is 2 x 2 layout cells: labels and tissue ratios by hand.
        rows, cols = label_map.shape[0] // 2, label_map.shape[1] // 2
        cells = label_map[: rows * 2, : cols * 2].reshape(rows, 2, cols, 2).transpose(0, 2, 1, 3)
        part = table[table["image_id"] == image_id].sort_values(["y", "x"])
        assert len(part) == rows * cols
        np.testing.assert_array_equal(part["label"], (cells == 2).any(axis=(2, 3)).ravel())
        np.testing.assert_allclose(part["tumor_fraction"], (cells == 2).mean(axis=(2, 3)).ravel())
        np.testing.assert_allclose(part["tissue_ratio"], (cells > 0).mean(axis=(2, 3)).ravel())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["parameters"]["tumor_values"] == [2]
    assert manifest["parameters"]["tissue_values"] == [1, 2]
    info = manifest["images"][first]
    assert info["tumor_source"] == f"mask {first}.png (label map, tumor values 2, 1/8 scale)"
    assert info["tissue"] == f"label map {first}.png, values 1, 2"


def trace_to_polygons(tumor: np.ndarray, scale: int) -> shapely.Geometry:
    """Outline of a cell mask as an annotator's polygons, in image pixels: marching
    squares through cell centres, rings combined even-odd so inner rings become holes."""
    contours = find_contours(np.pad(tumor.astype(float), 1), 0.5)
    rings = [
        shapely.Polygon(np.c_[(c[:, 1] - 0.5) * scale, (c[:, 0] - 0.5) * scale])
        for c in contours
        if len(c) >= 4
    ]
    return functools.reduce(shapely.symmetric_difference, rings, shapely.Polygon())


@pytest.mark.slow
def test_camelyon17_traced_to_geojson_agrees_with_the_label_map(
    shared_data: Path, tmp_path: Path
) -> None:
    raster = tmp_path / "raster"
    labels = painted_layouts(shared_data, raster, 6)
    polygons = tmp_path / "polygons"
    (polygons / "annotations").mkdir(parents=True)
    (polygons / "images").symlink_to(raster / "images")
    holes = 0
    for image_id, label_map in labels.items():
        region = trace_to_polygons(label_map == 2, LAYOUT_SCALE)
        holes += sum(len(p.interiors) for p in shapely.get_parts(region))
        feature = {
            "type": "Feature",
            "geometry": shapely.geometry.mapping(region),
            "properties": {"classification": {"name": "Tumor"}},
        }
        document = {"type": "FeatureCollection", "features": [feature]}
        (polygons / "annotations" / f"{image_id}.geojson").write_text(json.dumps(document))
    config = PatchifyConfig(patch_size=16, input_size=4, min_tissue=0)
    label_map = replace(config, tumor_values=(2,), tissue_values=(1, 2))
    expected = patchify(raster, tmp_path / "r", label_map).table
    table = patchify(polygons, tmp_path / "p", config).table
    both = expected.merge(table, on="patch_id", suffixes=("_raster", "_polygon"))
    assert len(both) == len(expected) == len(table) > 30_000
    raster_tumor, polygon_tumor = both["label_raster"] == 1, both["label_polygon"] == 1
    agreement = float((raster_tumor == polygon_tumor).mean())
    jaccard = float((raster_tumor & polygon_tumor).sum() / (raster_tumor | polygon_tumor).sum())
    assert agreement > 0.999  # measured 0.9996 on these six slides
    assert jaccard > 0.9  # measured 0.93: traced corners reach into neighbouring cells
    # Marching squares keeps a diamond around every tumor cell's centre: no tumor is lost.
    assert not (raster_tumor & ~polygon_tumor).any()
    corr = np.corrcoef(both["tumor_fraction_raster"], both["tumor_fraction_polygon"])[0, 1]
    assert corr > 0.99


# --- tiles filled with tissue ------------------------------------------------------------


def tissue_tile(root: Path, lumen: bool) -> None:
    """A 64 x 64 H&E-like tile with no glass: textured pink tissue everywhere and, with
    ``lumen``, white lumen filling the patch at (16, 16) and half the patch at (48, 32)."""
    tile = RNG.normal((190, 120, 170), 18, (64, 64, 3))
    if lumen:
        tile[16:32, 16:32] = RNG.normal(238, 4, (16, 16, 3))
        tile[32:48, 48:56] = RNG.normal(238, 4, (16, 8, 3))
    save(root / "images" / "t.png", np.clip(tile, 0, 255).astype(np.uint8))
    save(root / "masks" / "t.png", np.zeros((64, 64), np.uint8))


ARGS = ["--patch-size", "16", "--input-size", "4", "--min-tissue", "0", "--min-object-size", "4"]


def test_constant_tissue_ratio_is_reported(tmp_path: Path) -> None:
    tissue_tile(tmp_path / "data", lumen=False)
    result = invoke(str(tmp_path / "data"), str(tmp_path / "out"), *ARGS)
    assert result.exit_code == 0, result.output
    patches = PatchSet.open(tmp_path / "out")
    assert patches.table["tissue_ratio"].unique().tolist() == [1.0]
    assert patches.manifest["images"]["t"]["tissue_polarity"] == "none"
    assert patches.manifest["images"]["t"]["tissue_ratio_constant"] == 1.0
    text = " ".join(result.output.split())
    assert "warning: tissue_ratio is 1.000 on every kept patch of 1 image(s) (t)" in text
    assert "--tissue-method threshold --tissue-threshold T --background bright|dark" in text


def test_tissue_filled_tile_with_threshold(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tissue_tile(data, lumen=True)
    threshold = [*ARGS, "--tissue-method", "threshold", "--tissue-threshold", "0.8"]
    for background in ("auto", "bright"):  # a cut above 0.5 means bright glass
        out = tmp_path / background
        result = invoke(str(data), str(out), *threshold, "--background", background)
        assert result.exit_code == 0, result.output
        assert "tissue_ratio is" not in result.output
        table = PatchSet.open(out).table.set_index("patch_id")
        assert table.loc["t@16,16", "tissue_ratio"] < 0.05  # lumen
        assert abs(table.loc["t@48,32", "tissue_ratio"] - 0.5) < 0.05
        others = table.drop(index=["t@16,16", "t@48,32"])["tissue_ratio"]
        assert (others == 1.0).all() and len(others) == 14
        manifest = PatchSet.open(out).manifest
        assert manifest["parameters"]["background"] == background
        assert manifest["parameters"]["tissue_threshold"] == 0.8
        assert manifest["images"]["t"]["tissue_polarity"] == "bright-background"
    # The other polarity is the user's to choose, and it is honoured: lumen is tissue.
    result = invoke(str(data), str(tmp_path / "dark"), *threshold, "--background", "dark")
    assert result.exit_code == 0, result.output
    table = PatchSet.open(tmp_path / "dark").table.set_index("patch_id")
    assert table.loc["t@16,16", "tissue_ratio"] > 0.95
    assert table.drop(index=["t@16,16", "t@48,32"])["tissue_ratio"].max() < 0.5


@pytest.mark.slow
def test_bcss_region_with_threshold(shared_data: Path, tmp_path: Path) -> None:
    """A real tumor region filled with tissue (BCSS): Otsu finds no glass, a fixed
    threshold on the bright side finds the white lumen and fat."""
    root = tmp_path / "data"
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
        (root / folder / "1015.jpg").symlink_to(shared_data / "bcss" / folder / "1015.jpg")
    args = [str(root), "--patch-size", "256", "--input-size", "8", "--min-tissue", "0",
            "--min-object-size", "16"]  # fmt: skip
    plain = invoke(args[0], str(tmp_path / "otsu"), *args[1:])
    text = " ".join(plain.output.split())
    assert "tissue_ratio is 1.000 on every kept patch of 1 image(s) (1015)" in text
    result = invoke(args[0], str(tmp_path / "t"), *args[1:], "--tissue-method", "threshold",
                    "--tissue-threshold", "0.8")  # fmt: skip
    assert result.exit_code == 0, result.output
    table = PatchSet.open(tmp_path / "t").table
    ratio = table["tissue_ratio"].to_numpy()
    assert len(ratio) == 8 * 16 and len(np.unique(ratio)) > 50
    assert ratio.min() < 0.75 and 0.9 < np.median(ratio) < 1.0  # measured 0.695 and 0.987
    # Per patch, it follows the share of pixels under the threshold at full resolution
    # (the detection runs on a 1/4 block-mean thumbnail and closes small gaps).
    pixels = np.asarray(Image.open(root / "images" / "1015.jpg"), np.float32)
    low, high = np.percentile(pixels, [1, 99], axis=(0, 1))
    grey = np.clip((pixels - low) / (high - low), 0, 1).mean(axis=2)
    corners = zip(table["x"], table["y"], strict=True)
    under = [(grey[y : y + 256, x : x + 256] <= 0.8).mean() for x, y in corners]
    assert np.corrcoef(ratio, under)[0, 1] > 0.7  # measured 0.75


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--background", "sideways"], "--background: unknown polarity 'sideways'"),
        (["--missing-mask", "maybe"], "--missing-mask: unknown rule 'maybe'"),
        (["--tumor-values", "two"], "--tumor-values: give whole numbers like 2 or 1,2"),
        (["--tumor-values", "0,2"], "--tumor-values: give positive label values"),
        (["--tissue-values", "1"], "--tissue-values: reads the masks as label maps"),
        (["--tumor-classes", " , "], "--tumor-classes: give at least one class name"),
        (["--exclude-classes", "tumor"], "--tumor-classes/--exclude-classes: tumor given as both"),
    ],
)
def test_bad_input_options(tmp_path: Path, options: list[str], message: str) -> None:
    root = tmp_path / "data"
    image(root, "a")
    save(root / "masks" / "a.png", tumor_truth().astype(np.uint8))
    out = tmp_path / "out"
    result = invoke(str(root), str(out), "--patch-size", "8", "--input-size", "4", *options)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not out.exists()


def test_tissue_values_and_tissue_file_conflict(tmp_path: Path) -> None:
    root = tmp_path / "data"
    image(root, "a")
    save(root / "masks" / "a.png", np.where(tumor_truth(), 2, 1).astype(np.uint8))
    save(root / "tissue" / "a.png", np.ones((60, 64), np.uint8))
    result = invoke(str(root), str(tmp_path / "out"), "--patch-size", "8", "--input-size", "4",
                    "--tumor-values", "2", "--tissue-values", "1,2")  # fmt: skip
    assert result.exit_code == 2
    assert (
        "error: tissue/a.png: --tissue-values already takes the tissue of image 'a' from "
        "masks/a.png; use one of them"
    ) in " ".join(result.output.split())
