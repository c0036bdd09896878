"""`unshortcut predict`: the same patches and scores as patchify + the run, QuPath GeoJSON in
level-0 pixels that round-trips through the annotation path, heat maps, bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
import tifffile
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from unshortcut.cli import app
from unshortcut.config import TrainConfig
from unshortcut.errors import UnshortcutError
from unshortcut.inference import load_run_data, log_probabilities
from unshortcut.io.annotation_classes import AnnotationClasses
from unshortcut.io.annotations import read_annotations
from unshortcut.models import ModelOutput
from unshortcut.predict import PredictOptions, predict
from unshortcut.predict.core import tiling_of
from unshortcut.runs import load_model, open_run
from unshortcut.tiling.patchify import PatchifyConfig, patchify
from unshortcut.train import train

GLASS = np.array([238, 236, 240])
PINK = np.array([225, 150, 190])
PURPLE = np.array([110, 50, 140])
TILE = 256


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _discs(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tissue: three discs (level-0 centre y, x, radius); tumor: one disc on the first
    disc's border, annotated generously (it reaches onto the glass), as real tumor is."""
    rng = np.random.default_rng(seed)
    tissue = np.c_[rng.uniform(0.3, 0.7, 3) * size, rng.uniform(0.3, 0.7, 3) * size,
                   rng.uniform(0.15, 0.25, 3) * size]  # fmt: skip
    y, x, r = tissue[0]
    tumor = np.array([[y, x + 0.85 * r, 0.45 * r]])
    return tissue, tumor


def _inside(discs: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    return np.any(
        [(ys[:, None] - y) ** 2 + (xs[None] - x) ** 2 < r**2 for y, x, r in discs], axis=0
    )


def _tiles(size: int, scale: int, seed: int, mask: bool = False) -> Iterator[np.ndarray]:
    """Row-major tiles of a slide (or its tumor mask) at 1/``scale``, evaluated per tile."""
    tissue, tumor = _discs(size, seed)
    side = size // scale
    rng = np.random.default_rng([seed, scale])
    for ty in range(0, side, TILE):
        for tx in range(0, side, TILE):
            ys = (np.arange(ty, ty + TILE) + 0.5) * scale
            xs = (np.arange(tx, tx + TILE) + 0.5) * scale
            in_tumor = _inside(tumor, ys, xs)
            if mask:
                yield in_tumor.astype(np.uint8) * 255
                continue
            colour = np.where(in_tumor[..., None], PURPLE, PINK)
            colour = np.where(_inside(tissue, ys, xs)[..., None], colour, GLASS)
            noise = rng.integers(-12, 13, colour.shape)
            yield np.clip(colour + noise, 0, 255).astype(np.uint8)


def write_slide(path: Path, size: int, seed: int, pyramid: bool) -> Path:
    """A tiled JPEG TIFF written tile by tile (never whole in memory), optionally with a
    half-resolution pyramid level."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"tile": (TILE, TILE), "photometric": "rgb", "compression": "jpeg",
               "dtype": np.uint8}  # fmt: skip
    with tifffile.TiffWriter(path) as tif:
        tif.write(_tiles(size, 1, seed), shape=(size, size, 3), subifds=int(pyramid), **options)
        if pyramid:
            half = size // 2
            tif.write(_tiles(size, 2, seed), shape=(half, half, 3), subfiletype=1, **options)
    return path


def write_mask(path: Path, size: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [np.concatenate(list(row), axis=1) for row in
            _chunks(list(_tiles(size, 1, seed, mask=True)), size // TILE)]  # fmt: skip
    Image.fromarray(np.concatenate(rows)).save(path)


def _chunks(items: list[np.ndarray], n: int) -> Iterator[list[np.ndarray]]:
    for start in range(0, len(items), n):
        yield items[start : start + n]


LEVEL1 = PatchifyConfig(patch_size=32, input_size=8, level=1, split_unit="image", seed=0)
"""A run cut at pyramid level 1: 64 level-0 pixels a patch."""


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slides")
    for seed in range(5):
        write_slide(root / "data" / "images" / f"s{seed}.tif", 1024, seed, pyramid=True)
        write_mask(root / "data" / "masks" / f"s{seed}.png", 1024, seed)
    write_slide(root / "new" / "images" / "new.tif", 1536, 11, pyramid=True)
    write_mask(root / "new" / "masks" / "new.png", 1536, 11)
    return root


def _train(data: Path, tiling: PatchifyConfig, out: Path) -> Path:
    patchify(data, out / "patches", tiling)
    config = TrainConfig(patches=out / "patches", out=out / "run", epochs=4, batch_size=32,
                         lr=0.05, bootstrap=0, device="cpu", num_threads=1)  # fmt: skip
    return train(config, progress=False)


@pytest.fixture(scope="module")
def level1_run(slides: Path) -> Path:
    return _train(slides / "data", LEVEL1, slides / "level1")


@pytest.fixture(scope="module")
def predicted(level1_run: Path, slides: Path) -> Path:
    options = PredictOptions(csv=True, thumbnail_side=300)
    (result,) = predict(level1_run, [slides / "new" / "images" / "new.tif"], slides / "out",
                        options)  # fmt: skip
    assert result.scored > 100 and result.tumor > 5
    return result.folder


@pytest.mark.slow
def test_predict_scores_the_patches_patchify_cuts_as_the_run_scores_them(
    predicted: Path, level1_run: Path, slides: Path
) -> None:
    table = pd.read_parquet(predicted / "predictions.parquet")
    pd.testing.assert_frame_equal(table, pd.read_csv(predicted / "predictions.csv"),
                                  check_dtype=False)  # fmt: skip
    # The same image through patchify (with its mask), scored by the run as evaluate does.
    run = open_run(level1_run)
    reference = patchify(
        slides / "new", slides / "new-patches", replace(LEVEL1, split_fractions=(0, 0, 1))
    ).table
    merged = table.merge(reference, on="patch_id", suffixes=("", "_patchify"))
    assert len(merged) == len(table) == len(reference)
    np.testing.assert_allclose(merged["tissue_ratio"], merged["tissue_ratio_patchify"])
    data = load_run_data(slides / "new-patches", device=torch.device("cpu"), splits=("test",),
                         scheme=run.scheme, normalization=run.normalization,
                         robust_bins=run.robust_bins)  # fmt: skip
    scores = np.exp(log_probabilities(load_model(run), data.loaders["test"])[:, 1])
    expected = pd.Series(scores, index=data.table("test")["patch_id"])
    np.testing.assert_allclose(merged["score"], expected[merged["patch_id"]].to_numpy(), rtol=1e-5)
    # The run learned the texture: the predictions rank the true tumor patches.
    assert roc_auc_score(merged["label"], merged["score"]) > 0.9
    # Groups on the run's terms: predicted class x tissue-ratio bin, validation accuracy.
    metrics = json.loads((level1_run / "metrics.json").read_text())["val"]["groups"]
    for row in table.itertuples():
        assert row.group == ("tumor" if row.prediction else "non-tumor") + "|" + row.attribute
        expected_accuracy = metrics[row.group]["accuracy"]
        assert row.group_val_accuracy == pytest.approx(expected_accuracy, nan_ok=True)
        same_bin = [
            g["accuracy"]
            for name, g in metrics.items()
            if name.endswith(f"|{row.attribute}") and g["accuracy"] is not None
        ]
        assert row.worst_group_val_accuracy == pytest.approx(min(same_bin))
    assert (table["shaky"] == (table["worst_group_val_accuracy"] < 0.7)).all()


@pytest.mark.slow
def test_geojson_is_valid_with_level0_coordinates(predicted: Path) -> None:
    table = pd.read_parquet(predicted / "predictions.parquet")
    assert (table["size"] == 64).all()  # 32 px at level 1 = 64 level-0 pixels
    assert (table["x"] % 64 == 0).all() and (table["y"] % 64 == 0).all()
    assert table[["x", "y"]].to_numpy().max() + 64 <= 1536
    document = json.loads((predicted / "predictions.geojson").read_text())
    assert document["type"] == "FeatureCollection"
    assert len(document["features"]) == len(table)
    for feature, row in zip(document["features"], table.itertuples(), strict=True):
        polygon = shapely.geometry.shape(feature["geometry"])
        assert polygon.is_valid
        assert polygon.equals(shapely.box(row.x, row.y, row.x + 64, row.y + 64))
        properties = feature["properties"]
        assert properties["objectType"] == "tile"
        assert properties["classification"]["name"] == ("Tumor" if row.prediction else "Other")
        assert properties["measurements"]["tumor_probability"] == pytest.approx(row.score, abs=1e-6)
        assert properties["name"] == row.group
    contours = json.loads((predicted / "tumor.geojson").read_text())["features"]
    region = shapely.union_all([shapely.geometry.shape(f["geometry"]) for f in contours])
    assert region.is_valid
    assert region.area == pytest.approx(table["prediction"].sum() * 64**2)
    assert (
        sum(f["properties"]["measurements"]["patches"] for f in contours)
        == table["prediction"].sum()
    )
    for name in ("overlay.png", "shaky.png"):
        assert 200 < max(Image.open(predicted / name).size) <= 300


@pytest.mark.slow
@pytest.mark.parametrize("geojson", ["predictions.geojson", "tumor.geojson"])
def test_predicted_geojson_read_back_as_annotations_reproduces_the_tumor_patches(
    predicted: Path, level1_run: Path, slides: Path, tmp_path: Path, geojson: str
) -> None:
    table = pd.read_parquet(predicted / "predictions.parquet")
    data = tmp_path / "data"
    (data / "annotations").mkdir(parents=True)
    (data / "images").symlink_to(slides / "new" / "images")
    (data / "annotations" / "new.geojson").write_text((predicted / geojson).read_text())
    tumor = read_annotations(data / "annotations" / "new.geojson", AnnotationClasses()).tumor
    assert tumor.area == pytest.approx(table["prediction"].sum() * 64**2)
    back = patchify(data, tmp_path / "patches", tiling_of(open_run(level1_run))).table
    merged = table.merge(back, on="patch_id")
    assert len(merged) == len(table)
    assert (merged["label"] == merged["prediction"]).all()


@pytest.mark.slow
def test_cli_predict_and_its_errors(level1_run: Path, slides: Path, tmp_path: Path) -> None:
    image = slides / "new" / "images" / "new.tif"
    result = CliRunner().invoke(app, ["predict", str(level1_run), str(image), "--out",
                                      str(tmp_path / "out"), "--thumbnail-size", "64"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "patches scored" in result.output
    assert (tmp_path / "out" / "new" / "predictions.parquet").is_file()
    again = CliRunner().invoke(app, ["predict", str(level1_run), str(image), "--out",
                                     str(tmp_path / "out")])  # fmt: skip
    assert again.exit_code == 2 and "already exists" in again.output
    grey = tmp_path / "grey.png"
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(grey)
    wrong = CliRunner().invoke(app, ["predict", str(level1_run), str(grey), "--out",
                                     str(tmp_path / "o2")])  # fmt: skip
    assert wrong.exit_code == 2
    assert "level" in wrong.output or "channel" in wrong.output
    assert not (tmp_path / "o2" / "grey").exists()


def test_options_are_checked() -> None:
    with pytest.raises(UnshortcutError, match="--threshold"):
        PredictOptions(threshold=1.5).validate()
    with pytest.raises(UnshortcutError, match="--shaky-below"):
        PredictOptions(shaky_below=-0.1).validate()


# --------------------------------------------------------------------- bounded memory

LARGE = 12288
LEVEL0 = PatchifyConfig(patch_size=128, input_size=16, split_unit="image", seed=0)

_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    torch.set_num_threads(1)
    from unshortcut.predict import PredictOptions, predict
    run, small, large, out = sys.argv[1:5]
    # A small image first: imports and one-time allocations (MONAI alone is ~250 MB)
    # are then behind the high-water mark, and the growth is what the image size costs.
    predict(run, [small], out + "/small", PredictOptions(device="cpu"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (result,) = predict(run, [large], out + "/large", PredictOptions(device="cpu"))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_mb": (after - before) / 1024, "scored": result.scored,
                      "grid": result.grid_patches}))
    """
)


@pytest.mark.slow
def test_large_tiled_tiff_is_predicted_with_bounded_memory(slides: Path, tmp_path: Path) -> None:
    """A 12,288 px RGB slide (432 MiB decoded) is scored while the process grows by a
    small fraction of that: only bands, one batch and a thumbnail are ever in memory."""
    run = _train(slides / "data", LEVEL0, tmp_path / "level0")
    image = write_slide(tmp_path / "large.tif", LARGE, 21, pyramid=False)
    small = write_slide(tmp_path / "small.tif", 2048, 22, pyramid=False)  # the same path
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(run), str(small), str(image), str(tmp_path / "out")],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    report = json.loads(child.stdout.strip().splitlines()[-1])
    decoded_mb = LARGE * LARGE * 3 / 2**20
    assert report["grid"] == (LARGE // 128) ** 2
    assert report["scored"] > 1000
    assert report["growth_mb"] < 0.2 * decoded_mb, report


class _WithPixelMap(torch.nn.Module):
    """The run's model plus a pixel decoder that predicts the patch's logits everywhere."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def outputs(self, x: torch.Tensor) -> ModelOutput:
        out = self.model.outputs(x)
        pixel = out.logits[:, :, None, None].expand(-1, -1, *x.shape[-2:])
        return ModelOutput(out.logits, out.features, pixel)


@pytest.mark.slow
def test_models_with_a_pixel_decoder_get_a_pixel_map(
    level1_run: Path, slides: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from unshortcut.predict import core

    monkeypatch.setattr(core, "load_model", lambda *a, **k: _WithPixelMap(load_model(*a, **k)))
    image = slides / "new" / "images" / "new.tif"
    (result,) = predict(level1_run, [image], tmp_path, PredictOptions(thumbnail_side=300))
    pixel_map = tifffile.imread(result.folder / "pixel_probability.tif")
    assert pixel_map.dtype == np.float32
    assert pixel_map.shape[::-1] == Image.open(result.folder / "overlay.png").size
    assert np.nanmin(pixel_map) >= 0 and np.nanmax(pixel_map) <= 1
    # Each patch's pixels carry its own probability: at every patch centre, its score.
    table = pd.read_parquet(result.folder / "predictions.parquet")
    scale = 1536 / pixel_map.shape[1]
    rows = ((table["y"] + 32) / scale).astype(int)
    cols = ((table["x"] + 32) / scale).astype(int)
    np.testing.assert_allclose(pixel_map[rows, cols], table["score"], rtol=1e-4, atol=1e-6)
    assert np.isfinite(pixel_map).sum() == pytest.approx(len(table) * (64 / scale) ** 2, rel=0.1)
