"""``predict``: a run's model over whole images, patch by patch, with bounded memory.

Per image, the work is patchify's own: one decode pass (:func:`unshortcut.tiling.
patchify.pass_image`: tiles or bands decoded once, every grid patch shrunk to the run's
input size and written in grid order to a scratch file, the thumbnail and tissue
detection exactly as the run's patch set was made), then the patches with enough
tissue are read back in order, a batch at a time, prepared as the run prepares its
input (stain normalisation when the run has one, the training channel statistics) and
scored through ``model.outputs``. Memory holds a few bands, one batch, the thumbnail
and one number per grid position, whatever the image size; the pixels of all patches
are never in memory together.

Each scored patch gets its group on the run's own terms: the attribute bins of the
run's group scheme (its tissue ratio, and image metadata given with ``metadata``) and
the predicted class; ``group_val_accuracy`` is that group's validation accuracy in
the run's metrics, ``worst_group_val_accuracy`` the lowest validation accuracy of any
class in the patch's attribute bin. The second is what the shaky-ground layer shows:
where the run failed some class on validation, a prediction either way deserves doubt
(the label of a new patch is unknown, so the predicted group alone would hide a
tumor patch wrongly called non-tumor).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import shapely
import torch

from unshortcut.atomic import atomic_directory
from unshortcut.errors import UnshortcutError
from unshortcut.groups import GroupScheme
from unshortcut.inference import THRESHOLD, resolve_device
from unshortcut.io.discover import ImageEntry
from unshortcut.io.rasterise import PolygonMask
from unshortcut.io.readers import image_stem, open_image
from unshortcut.predict import geojson, maps
from unshortcut.runs import Run, load_model, open_run, read_json
from unshortcut.tiling.grid import Grid, make_grid
from unshortcut.tiling.patchify import ImagePass, PatchifyConfig, pass_image
from unshortcut.tiling.tissue import thumbnail_of

#: Patchify parameters that decide how an image is cut and its tissue measured.
TILING_FIELDS = (
    "patch_size",
    "input_size",
    "stride",
    "level",
    "min_tissue",
    "tissue_method",
    "tissue_threshold",
    "min_object_size",
    "background",
)
#: Grid positions read from the scratch file per chunk.
READ_CHUNK = 1024

Progress = Callable[[str, str, int, int], None]
"""Called as (image_id, stage, done, total); stage is "reading" (bands) or "scoring"."""


@dataclass(frozen=True)
class PredictOptions:
    """Everything ``predict`` lets a user choose (defaults: the run's own settings)."""

    threshold: float = THRESHOLD
    """Tumor probability from which a patch is called Tumor (table, GeoJSON, contours)."""
    shaky_below: float = 0.7
    """A patch whose worst-group validation accuracy is below this is on shaky ground."""
    csv: bool = False
    batch_size: int = 256
    thumbnail_side: int = 2048
    min_tissue: float | None = None
    """Patches with less tissue are not scored (default: the run's patch set's)."""
    criterion: str | None = None
    device: str = "auto"
    metadata: Path | None = None
    """CSV with image_id and image-level attributes for groups that use them."""
    overwrite: bool = False

    def validate(self) -> None:
        if not 0 < self.threshold < 1:
            raise UnshortcutError(f"--threshold: must lie in (0, 1), got {self.threshold}")
        if not 0 <= self.shaky_below <= 1:
            raise UnshortcutError(f"--shaky-below: must lie in [0, 1], got {self.shaky_below}")
        if self.batch_size < 1 or self.thumbnail_side < 16:
            raise UnshortcutError("--batch-size must be >= 1 and --thumbnail-size >= 16")
        if self.min_tissue is not None and not 0 <= self.min_tissue <= 1:
            raise UnshortcutError("--min-tissue: must lie in [0, 1]")


@dataclass
class ImageResult:
    """What predict wrote for one image and how long it took."""

    image_id: str
    folder: Path
    grid_patches: int
    scored: int
    tumor: int
    shaky: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def patches_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class _Scorer:
    """A run as predict uses it: model, input preparation, groups and their accuracy."""

    run: Run
    model: torch.nn.Module
    device: torch.device
    tiling: PatchifyConfig
    scheme: GroupScheme
    group_accuracy: np.ndarray
    """Validation accuracy per group (NaN where the group had no validation patch)."""
    channels: int
    dtype: np.dtype

    @property
    def worst_in_bin(self) -> np.ndarray:
        """Per attribute bin, the lowest validation accuracy of any class there."""
        table = self.group_accuracy.reshape(self.scheme.n_classes, self.scheme.n_attributes)
        with np.errstate(all="ignore"):
            defined = np.where(np.isnan(table), np.inf, table).min(axis=0)
        return np.where(np.isinf(defined), np.nan, defined)

    @torch.no_grad()
    def score(self, pixels: np.ndarray) -> tuple[np.ndarray, torch.Tensor | None]:
        """Tumor probabilities (float64) of raw (B, C, S, S) patches, and the (B, S, S)
        pixel probabilities when the model predicts a map."""
        x = torch.from_numpy(pixels.astype(np.float32, copy=False))
        normalization = self.run.normalization
        if normalization.stain is not None:
            x = normalization.stain.as_stored(x)
        inv_std, bias = normalization.affine()
        x = torch.addcmul(bias, x, inv_std).to(self.device)
        out = self.model.outputs(x)
        probability = torch.softmax(out.logits.double(), dim=1)[:, 1].cpu().numpy()
        pixel = None
        if out.pixel_logits is not None:
            pixel = torch.softmax(out.pixel_logits.float(), dim=1)[:, 1]
        return probability, pixel


def tiling_of(run: Run) -> PatchifyConfig:
    """How the run's patch set was cut (its manifest), to cut new images alike."""
    path = Path(run.config.patches) / "manifest.json"
    if not path.is_file():
        raise UnshortcutError(
            f"{path}: missing; predict cuts images as the run's patch set was cut and "
            "needs its manifest"
        )
    parameters = read_json(path).get("parameters", {})
    missing = [name for name in ("patch_size", "input_size") if name not in parameters]
    if missing:
        raise UnshortcutError(
            f"{path}: no {', '.join(missing)} among its parameters (not made by patchify), "
            "so predict does not know how to cut images for this run"
        )
    return PatchifyConfig(**{k: parameters[k] for k in TILING_FIELDS if k in parameters})


def _scorer(run: Run, options: PredictOptions) -> _Scorer:
    device = resolve_device(options.device)
    criterion = options.criterion or run.config.primary_criterion
    model = load_model(run, criterion, device)
    metrics = run.metrics
    val = (metrics.get("by_criterion", {}).get(criterion) or metrics)["val"]
    scheme = run.scheme
    accuracy = np.array(
        [
            np.nan if (g := val["groups"].get(name)) is None or g["accuracy"] is None else
            float(g["accuracy"])
            for name in scheme.group_names
        ]
    )  # fmt: skip
    tiling = tiling_of(run)
    if options.min_tissue is not None:
        tiling = dataclasses.replace(tiling, min_tissue=options.min_tissue)
    manifest = read_json(Path(run.config.patches) / "manifest.json")
    return _Scorer(
        run, model, device, tiling, scheme, accuracy,
        int(run.resolved["input"]["channels"]), np.dtype(manifest.get("dtype", "uint8")),
    )  # fmt: skip


def predict(
    run_path: Path | str,
    images: Sequence[Path | str],
    out: Path | str,
    options: PredictOptions | None = None,
    on_progress: Progress | None = None,
) -> list[ImageResult]:
    """Score every image with the run's selected model; write ``out/<image_id>/``.

    Each folder (written atomically) holds ``predictions.parquet`` (and ``.csv`` on
    request), ``predictions.geojson`` (one QuPath tile per scored patch),
    ``tumor.geojson`` (merged contours of the patches called tumor), ``overlay.png``
    (tumor probability over the thumbnail), ``shaky.png`` (1 - worst-group validation
    accuracy over the thumbnail) and, for models with a pixel decoder,
    ``pixel_probability.tif`` (float32, NaN where nothing was scored).
    """
    options = options or PredictOptions()
    options.validate()
    run = open_run(run_path)
    paths = [Path(p) for p in images]
    if not paths:
        raise UnshortcutError("predict: give at least one image")
    ids = [image_stem(p) for p in paths]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise UnshortcutError(f"predict: several images share the id {repeated[0]!r}")
    metadata = _metadata(options.metadata, ids)
    scorer = _scorer(run, options)
    results = []
    for path, image_id in zip(paths, ids, strict=True):
        folder = Path(out) / image_id
        results.append(
            _predict_image(
                scorer, path, image_id, folder, options, metadata.get(image_id, {}), on_progress
            )
        )
    return results


def _metadata(path: Path | None, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Image-level attributes by image id (one row per predicted image)."""
    if path is None:
        return {}
    from unshortcut.io.metadata import read_metadata

    table = read_metadata(path, ids)
    return {row["image_id"]: row for row in table.to_dict("records")}


def _predict_image(
    scorer: _Scorer,
    path: Path,
    image_id: str,
    folder: Path,
    options: PredictOptions,
    metadata: dict[str, Any],
    on_progress: Progress | None,
) -> ImageResult:
    start = time.perf_counter()
    tiling = scorer.tiling
    with open_image(path) as reader:
        _check_image(scorer, reader, path)
        height, width = reader.level_shape(tiling.level)
        grid = make_grid(height, width, tiling.patch_size, tiling.resolved_stride, str(path))
        downsample = round(reader.level_downsample(tiling.level))
        with atomic_directory(folder, overwrite=options.overwrite) as tmp:
            scratch = tmp / ".grid-pixels.raw"
            measured = _decode_pass(reader, path, image_id, grid, downsample, tiling, scratch,
                                    on_progress)  # fmt: skip
            thumbnail, thumbnail_downsample = _thumbnail(reader, measured, options)
            canvas = maps.Canvas.fit(
                maps.fit_extent(thumbnail.shape[:2], thumbnail_downsample),
                options.thumbnail_side,
                finest=thumbnail_downsample,
            )
            keep = measured.tissue_ratio >= tiling.min_tissue
            scores, pixel_map = _score_all(
                scorer, scratch, keep, measured, grid, downsample, canvas, options, image_id,
                on_progress,
            )  # fmt: skip
            scratch.unlink()
            table, warnings = _table(scorer, image_id, measured, keep, scores, grid, downsample,
                                     metadata, options)  # fmt: skip
            _write(tmp, table, thumbnail, canvas, grid, downsample, keep, pixel_map, options)
    return ImageResult(
        image_id,
        folder,
        int(keep.size),
        int(keep.sum()),
        int(table["prediction"].sum()),
        int(table["shaky"].sum()),
        time.perf_counter() - start,
        warnings,
    )


def _check_image(scorer: _Scorer, reader: Any, path: Path) -> None:
    level = scorer.tiling.level
    if level >= reader.level_count:
        raise UnshortcutError(
            f"{path}: has {reader.level_count} level(s); the run's patches were cut at "
            f"level {level}"
        )
    if int(reader.channels) != scorer.channels:
        raise UnshortcutError(
            f"{path}: has {reader.channels} channel(s), the run was trained on {scorer.channels}"
        )
    if np.dtype(reader.dtype) != scorer.dtype:
        raise UnshortcutError(
            f"{path}: stores {np.dtype(reader.dtype)} pixels, the run was trained on "
            f"{scorer.dtype} patches (its normalisation would not fit)"
        )


def _decode_pass(
    reader: Any,
    path: Path,
    image_id: str,
    grid: Grid,
    downsample: int,
    tiling: PatchifyConfig,
    scratch: Path,
    on_progress: Progress | None,
) -> ImagePass:
    """patchify's pass with an empty tumor mask; patch masks are not kept."""
    entry = ImageEntry(image_id, path, None)
    no_tumor = PolygonMask(shapely.Polygon(), reader.level_shape(0))
    done = [0]

    def on_band() -> None:
        done[0] += 1
        if on_progress is not None:
            on_progress(image_id, "reading", done[0], grid.rows)

    with open(scratch, "wb") as pixel_out, open(os.devnull, "wb") as mask_out:
        return pass_image(entry, reader, no_tumor, grid, downsample, tiling, pixel_out,
                          mask_out, on_band)  # fmt: skip


def _thumbnail(
    reader: Any, measured: ImagePass, options: PredictOptions
) -> tuple[np.ndarray, float]:
    """The pass's own thumbnail when it built one, else a pyramid level or block mean."""
    if measured.thumbnail is not None:
        return maps.display_rgb(measured.thumbnail), float(measured.thumbnail_downsample)
    pixels, downsample = thumbnail_of(reader, options.thumbnail_side)
    return maps.display_rgb(pixels.astype(np.dtype(reader.dtype))), float(downsample)


def _kept_batches(
    scratch: Path, keep: np.ndarray, row_shape: tuple[int, ...], dtype: np.dtype, batch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(grid positions, pixels) of the kept patches, in grid order, ``batch`` at a time,
    read sequentially from the scratch file a chunk at a time."""
    items = int(np.prod(row_shape))
    positions: list[np.ndarray] = []
    pixels: list[np.ndarray] = []
    pending = 0
    with open(scratch, "rb") as handle:
        for start in range(0, keep.size, READ_CHUNK):
            chosen = keep[start : start + READ_CHUNK]
            rows = np.fromfile(handle, dtype=dtype, count=chosen.size * items)
            rows = rows.reshape(chosen.size, *row_shape)[chosen]
            positions.append(start + np.flatnonzero(chosen))
            pixels.append(rows)
            pending += len(rows)
            while pending >= batch:
                all_positions, all_pixels = np.concatenate(positions), np.concatenate(pixels)
                yield all_positions[:batch], all_pixels[:batch]
                positions, pixels = [all_positions[batch:]], [all_pixels[batch:]]
                pending -= batch
    if pending:
        yield np.concatenate(positions), np.concatenate(pixels)


def _score_all(
    scorer: _Scorer,
    scratch: Path,
    keep: np.ndarray,
    measured: ImagePass,
    grid: Grid,
    downsample: int,
    canvas: maps.Canvas,
    options: PredictOptions,
    image_id: str,
    on_progress: Progress | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Tumor probability per grid position (NaN where not scored) and the pixel map."""
    size = scorer.tiling.input_size
    scores = np.full(keep.size, np.nan)
    accumulator: maps.PixelMapAccumulator | None = None
    total, done = int(keep.sum()), 0
    was_training = scorer.model.training
    scorer.model.eval()
    batches = _kept_batches(scratch, keep, (scorer.channels, size, size), scorer.dtype,
                            options.batch_size)  # fmt: skip
    for positions, pixels in batches:
        probability, pixel = scorer.score(pixels)
        scores[positions] = probability
        if pixel is not None:
            accumulator = accumulator or maps.PixelMapAccumulator(canvas)
            accumulator.add(pixel, measured.ys[positions], measured.xs[positions],
                            grid.size * downsample)  # fmt: skip
        done += len(positions)
        if on_progress is not None:
            on_progress(image_id, "scoring", done, total)
    scorer.model.train(was_training)
    return scores, None if accumulator is None else accumulator.mean()


def _table(
    scorer: _Scorer,
    image_id: str,
    measured: ImagePass,
    keep: np.ndarray,
    scores: np.ndarray,
    grid: Grid,
    downsample: int,
    metadata: dict[str, Any],
    options: PredictOptions,
) -> tuple[pd.DataFrame, list[str]]:
    """One row per scored patch: position, tissue, metadata, group and its accuracy."""
    x, y = measured.xs[keep], measured.ys[keep]
    score = scores[keep]
    prediction = (score >= options.threshold).astype(np.int64)
    table = pd.DataFrame(
        {
            "image_id": image_id,
            "patch_id": [f"{image_id}@{a},{b}" for a, b in zip(x, y, strict=True)],
            "x": x,
            "y": y,
            "size": grid.size * downsample,
            "tissue_ratio": measured.tissue_ratio[keep],
        }
    )
    for column, value in metadata.items():
        if column not in table.columns and column not in ("patient_id", "split"):
            table[column] = value
    attribute_names = np.asarray(scorer.scheme.attribute_names, dtype=object)
    group_names = np.asarray(scorer.scheme.group_names, dtype=object)
    warnings: list[str] = []
    try:
        attribute = scorer.scheme.attribute_index(table, f"{image_id} (predicted patches)")
    except UnshortcutError as error:
        attribute = None
        warnings.append(
            f"{error}; groups and their validation accuracy are left empty (give the "
            "image-level attributes with --metadata)"
        )
    if attribute is None:
        table["attribute"] = ""
        table["group"] = ""
        table["group_val_accuracy"] = np.nan
        table["worst_group_val_accuracy"] = np.nan
    else:
        group = prediction * scorer.scheme.n_attributes + attribute
        table["attribute"] = attribute_names[attribute]
        table["group"] = group_names[group]
        table["group_val_accuracy"] = scorer.group_accuracy[group]
        table["worst_group_val_accuracy"] = scorer.worst_in_bin[attribute]
    table["shaky"] = table["worst_group_val_accuracy"].to_numpy() < options.shaky_below
    table["score"] = score
    table["prediction"] = prediction
    return table, warnings


def _write(
    folder: Path,
    table: pd.DataFrame,
    thumbnail: np.ndarray,
    canvas: maps.Canvas,
    grid: Grid,
    downsample: int,
    keep: np.ndarray,
    pixel_map: np.ndarray | None,
    options: PredictOptions,
) -> None:
    table.to_parquet(folder / "predictions.parquet", index=False)
    if options.csv:
        table.to_csv(folder / "predictions.csv", index=False)
    geojson.write_feature_collection(folder / "predictions.geojson", geojson.tile_features(table))
    geojson.write_feature_collection(folder / "tumor.geojson", geojson.contour_features(table))
    base = maps.resized(thumbnail, canvas)
    per_position = np.full(keep.size, np.nan)
    per_position[keep] = table["score"].to_numpy()
    probability = maps.patch_map(per_position, grid, downsample, canvas)
    if pixel_map is not None:
        import tifffile

        tifffile.imwrite(folder / "pixel_probability.tif", pixel_map, compression="zlib")
        probability = pixel_map
    maps.save_png(folder / "overlay.png", maps.overlay(base, probability, maps.PROBABILITY_COLORS))
    per_position[keep] = 1 - table["worst_group_val_accuracy"].to_numpy()
    shaky = maps.patch_map(per_position, grid, downsample, canvas)
    maps.save_png(folder / "shaky.png", maps.overlay(base, shaky, maps.SHAKY_COLORS))
