"""Images + tumor masks -> a labelled patch set (the library side of ``unshortcut patchify``).

Order of work, chosen so that a user's mistake costs nothing and a crash loses little:
every image and mask is opened and checked first (sizes, masks present, mask encodings,
annotation files parsed, patch fits, one channel count and pixel type);
then each image is tiled in one decode pass (see :mod:`unshortcut.tiling.bands`),
tissue is measured for every grid position, glass-only patches are dropped and the
kept ones are written to the image's own *part* (``OUT.partial/parts/<n>/``, each part
written atomically). Images are tiled in parallel processes when ``workers > 1``, with
memory bounded per worker (a few bands of one image). A killed patchify keeps its
finished parts: the same command again tiles only the images that are missing. Last,
the parts are joined in image order into one patch set (byte for byte what a serial
run writes), splits are drawn when the labels of all patches are known, and the set
is renamed into place atomically; then the partial folder goes.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import pandas as pd

from unshortcut.atomic import atomic_directory, atomic_write_text, clean_leftovers
from unshortcut.errors import UnshortcutError
from unshortcut.io.annotation_classes import (
    DEFAULT_EXCLUDE_CLASSES,
    DEFAULT_TUMOR_CLASSES,
    AnnotationClasses,
)
from unshortcut.io.discover import MISSING_MASK_RULES
from unshortcut.tiling.bands import tile_image
from unshortcut.tiling.grid import Grid, labels_from_fractions, make_grid, thumbnail_factor
from unshortcut.tiling.patchset import (
    MANIFEST_FILE,
    MASKS_FILE,
    PIXELS_FILE,
    REQUIRED_COLUMNS,
    SPLITS,
    TABLE_FILE,
    NpyAppender,
    PatchSet,
    base_manifest,
    write_manifest,
    write_table,
)
from unshortcut.tiling.splits import SPLIT_UNITS, draw_splits, split_warnings, unit_keys

if TYPE_CHECKING:
    from unshortcut.io.discover import ImageEntry
    from unshortcut.io.tumor import TumorMask
    from unshortcut.tiling.tissue import TissueMask

DEFAULT_MIN_TISSUE = 0.05
#: Columns patchify computes; metadata.csv may not define them.
_PATCH_COLUMNS = ("patch_id", "x", "y", "size", "level", "tumor_fraction", "tissue_ratio", "label")
#: A pyramid level at most this long a side is used for tissue detection as it is.
PYRAMID_THUMBNAIL_SIDE = 4096
# Patches are compacted from the temporary store this many at a time.
_COMPACT_CHUNK = 1024
#: --background choices and the tissue polarity each one means.
BACKGROUNDS = {"auto": "auto", "bright": "bright-background", "dark": "dark-background"}
#: Image ids a warning lists before it only counts the rest.
_SHOWN_IDS = 8


@dataclass(frozen=True)
class PatchifyConfig:
    """Every parameter of a patchify run; stored verbatim in the manifest."""

    patch_size: int = 256
    input_size: int = 64
    stride: int | None = None
    level: int = 0
    min_tissue: float = DEFAULT_MIN_TISSUE
    min_tumor_fraction: float | None = None
    tissue_method: str = "otsu"
    tissue_threshold: float | None = None
    min_object_size: float = 64.0
    split_unit: str = "patient"
    region_size: int | None = None
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    seed: int = 0
    background: str = "auto"
    tumor_values: tuple[int, ...] | None = None
    tissue_values: tuple[int, ...] | None = None
    tumor_classes: tuple[str, ...] = DEFAULT_TUMOR_CLASSES
    exclude_classes: tuple[str, ...] = DEFAULT_EXCLUDE_CLASSES
    missing_mask: str = "error"

    @property
    def resolved_stride(self) -> int:
        return self.stride or self.patch_size

    def validate(self) -> None:
        if self.patch_size < 1 or self.input_size < 1 or self.resolved_stride < 1:
            raise UnshortcutError("--patch-size/--input-size/--stride: must be positive")
        if self.input_size > self.patch_size:
            raise UnshortcutError(
                f"--input-size: {self.input_size} is larger than --patch-size {self.patch_size}"
                " (patches are only ever shrunk)"
            )
        if self.level < 0:
            raise UnshortcutError("--level: must be 0 or a positive pyramid level")
        if not 0 <= self.min_tissue <= 1:
            raise UnshortcutError("--min-tissue: must lie in [0, 1]")
        if self.min_tumor_fraction is not None and not 0 < self.min_tumor_fraction <= 1:
            raise UnshortcutError("--min-tumor-fraction: must lie in (0, 1]")
        if self.tissue_method not in ("otsu", "threshold"):
            raise UnshortcutError(
                f"--tissue-method: unknown method {self.tissue_method!r} (use otsu or threshold)"
            )
        if self.tissue_method == "threshold" and not 0 <= (self.tissue_threshold or -1) <= 1:
            raise UnshortcutError(
                "--tissue-threshold: --tissue-method threshold needs a value in [0, 1]"
            )
        if self.min_object_size < 0:
            raise UnshortcutError("--min-object-size: must be 0 or a positive pixel count")
        if self.split_unit not in SPLIT_UNITS:
            raise UnshortcutError(
                f"--split-unit: unknown unit {self.split_unit!r} (use {', '.join(SPLIT_UNITS)})"
            )
        if self.seed < 0:
            raise UnshortcutError(f"--seed: must be 0 or more, got {self.seed}")
        if self.region_size is not None and self.region_size < 1:
            raise UnshortcutError("--region-size: must be a positive number of pixels")
        if self.background not in BACKGROUNDS:
            raise UnshortcutError(
                f"--background: unknown polarity {self.background!r} (use auto, bright or dark)"
            )
        if self.missing_mask not in MISSING_MASK_RULES:
            raise UnshortcutError(
                f"--missing-mask: unknown rule {self.missing_mask!r} (use error or negative)"
            )
        for option, values in (("--tumor-values", self.tumor_values),
                               ("--tissue-values", self.tissue_values)):  # fmt: skip
            if values is not None and (not values or min(values) < 1):
                raise UnshortcutError(
                    f"{option}: give positive label values (0 is always background)"
                )
        if self.tissue_values is not None and self.tumor_values is None:
            raise UnshortcutError(
                "--tissue-values: reads the masks as label maps, so say which of their "
                "values are tumor with --tumor-values too"
            )
        self.annotation_classes.validate()

    @property
    def annotation_classes(self) -> AnnotationClasses:
        return AnnotationClasses(self.tumor_classes, self.exclude_classes)


@dataclass
class PatchifyResult:
    """What the CLI prints: where the set went, its table and the warnings to show."""

    path: Path
    table: pd.DataFrame
    manifest: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Source:
    """One checked image: its files, level-0 shape, grid, and what its tumor mask is."""

    entry: ImageEntry
    shape: tuple[int, int]
    grid: Grid
    downsample: int
    tumor_source: str
    warnings: list[str]
    pixel_kind: tuple[int, str]
    """(channels, dtype) of the image."""

    @property
    def image_id(self) -> str:
        return self.entry.image_id

    @property
    def image_path(self) -> Path:
        return self.entry.image


BandHook = Callable[[str, int, int, int], Callable[[], None]]
"""Called as (image_id, images done, image count, band count) before each image; returns
a callback run after every band (the CLI's progress bar)."""


def patchify(
    data_dir: Path,
    out_dir: Path,
    config: PatchifyConfig | None = None,
    overwrite: bool = False,
    on_image: BandHook | None = None,
    workers: int = 1,
) -> PatchifyResult:
    """Tile every image of ``data_dir`` into a patch set at ``out_dir``.

    ``workers`` images are tiled at once in separate processes; the result does not
    depend on it. An interrupted run's finished images (``OUT.partial/``) are reused
    when the command is the same.
    """
    from unshortcut.io.discover import discover_dataset
    from unshortcut.io.metadata import read_metadata

    config = config or PatchifyConfig()
    config.validate()
    if workers < 1:
        raise UnshortcutError(f"--workers: must be at least 1, got {workers}")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    partial = partial_folder(out_dir)
    exists = out_dir.exists() and not overwrite
    if exists and not (partial / "plan.json").is_file():
        raise UnshortcutError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    entries = discover_dataset(data_dir, config.missing_mask)
    metadata_path = data_dir / "metadata.csv"
    metadata = (
        read_metadata(metadata_path, [e.image_id for e in entries])
        if metadata_path.is_file()
        else None
    )
    sources = [_check_entry(entry, config) for entry in entries]
    _check_pixel_types(sources)
    _check_metadata_columns(metadata)
    if exists:
        return _finished_before(out_dir, partial, _plan(data_dir, config, sources))
    notes = _prepare_partial(partial, data_dir, config, sources)
    try:
        _tile_parts(sources, config, partial, on_image, workers)
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            parts, per_image, pixel_info, checksums = _join_parts(sources, partial, config, tmp)
            table = _assemble_table(parts, metadata, config)
            warnings = notes + _input_warnings(sources, per_image)
            warnings += split_warnings(
                table,
                None if "split" in _columns(metadata) else config.split_fractions,
                check_patients=config.split_unit != "region",
            )
            checksums[TABLE_FILE] = write_table(table, tmp / TABLE_FILE)
            manifest = _manifest(
                data_dir, config, table, per_image, pixel_info, metadata, checksums
            )
            write_manifest(manifest, tmp / MANIFEST_FILE)
    except UnshortcutError:
        # A mistake in the input or settings: fixing it changes the plan, so the parts
        # could not be reused; nothing is left behind.
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(partial)
    return PatchifyResult(out_dir, table, manifest, warnings)


def _finished_before(out_dir: Path, partial: Path, plan: dict[str, Any]) -> PatchifyResult:
    """OUT exists beside an OUT.partial: the same command was killed after the patch set
    was in place and before its parts were removed. Remove them and report the set; a
    partial of other settings means OUT is another patch set, which is not replaced."""
    if json.loads((partial / "plan.json").read_text("utf-8")) != plan:
        raise UnshortcutError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    shutil.rmtree(partial)
    patch_set = PatchSet.open(out_dir)
    note = f"{out_dir}: was finished before an interruption; removed the leftover {partial}"
    return PatchifyResult(out_dir, patch_set.table, patch_set.manifest, [note])


def _check_metadata_columns(metadata: pd.DataFrame | None) -> None:
    reserved = sorted(set(_columns(metadata)) & set(_PATCH_COLUMNS))
    if reserved:
        raise UnshortcutError(
            f"metadata.csv: column(s) {', '.join(reserved)} are patch attributes computed by "
            "patchify; rename them"
        )


def partial_folder(out_dir: Path) -> Path:
    """Where an unfinished patchify keeps the images it has tiled (visible, beside OUT)."""
    return out_dir.with_name(f"{out_dir.name}.partial")


def _plan(data_dir: Path, config: PatchifyConfig, sources: list[_Source]) -> dict[str, Any]:
    """What the parts depend on: the settings and every input file's size and age."""
    files = []
    for source in sources:
        entry = source.entry
        for path in (entry.image, entry.mask, entry.annotation, entry.tissue):
            if path is not None:
                stat = Path(path).stat()
                files.append([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
    parameters = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    return {"data": str(data_dir.resolve()), "parameters": parameters, "files": files}


def _prepare_partial(
    partial: Path, data_dir: Path, config: PatchifyConfig, sources: list[_Source]
) -> list[str]:
    """Reuse an interrupted run's parts when its plan is this one; else start afresh.

    Returns the notes the user must read (what was reused, what was discarded).
    """
    plan = _plan(data_dir, config, sources)
    plan_file = partial / "plan.json"
    notes = []
    if partial.is_dir():
        same = plan_file.is_file() and json.loads(plan_file.read_text("utf-8")) == plan
        if same:
            done = sum(1 for i in range(len(sources)) if _part(partial, i).is_dir())
            notes.append(
                f"resumed an interrupted patchify: {done} of {len(sources)} image(s) were "
                f"already tiled in {partial}"
            )
        else:
            notes.append(
                f"{partial}: held an interrupted patchify of other inputs or settings; "
                "discarded and started afresh"
            )
            shutil.rmtree(partial)
    if not partial.is_dir():
        (partial / "parts").mkdir(parents=True)
        atomic_write_text(plan_file, json.dumps(plan, indent=2))
    # A part or patch set being written when a run was killed (once here, not per part).
    notes += clean_leftovers(partial / "parts") + clean_leftovers(partial.parent)
    return notes


def _part(partial: Path, index: int) -> Path:
    return partial / "parts" / f"{index:06d}"


def _tile_parts(
    sources: list[_Source],
    config: PatchifyConfig,
    partial: Path,
    on_image: BandHook | None,
    workers: int,
) -> None:
    """Tile every image without a finished part: in this process (with per-band progress),
    or in ``workers`` spawned processes (progress per image)."""
    todo = [i for i in range(len(sources)) if not _part(partial, i).is_dir()]
    done = len(sources) - len(todo)
    if workers == 1 or len(todo) < 2:
        for index in todo:
            source = sources[index]
            hook = (
                on_image(source.image_id, done, len(sources), source.grid.rows)
                if on_image
                else None
            )
            tile_part(source, config, _part(partial, index), hook)
            done += 1
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context) as pool:
        futures = {pool.submit(tile_part, sources[i], config, _part(partial, i)): i for i in todo}
        for future in as_completed(futures):
            future.result()
            done += 1
            if on_image is not None:
                on_image(sources[futures[future]].image_id, done, len(sources), 0)


def tile_part(
    source: _Source,
    config: PatchifyConfig,
    part: Path,
    on_band: Callable[[], None] | None = None,
) -> None:
    """One image into its part folder (written atomically): pixels.npy and masks.npy of
    the kept patches, rows.parquet, info.json. What a worker process runs."""
    from unshortcut.io.readers import open_image

    with (
        atomic_directory(part, clean=False) as tmp,
        _opened(open_image(source.image_path)) as reader,
        _opened(_open_tumor(source.entry, source.shape, config)) as tumor,
        ExitStack() as stores,
    ):
        side = config.input_size
        pixels = NpyAppender(tmp / PIXELS_FILE, (int(reader.channels), side, side), reader.dtype)
        masks = NpyAppender(tmp / MASKS_FILE, (side, side), np.uint8)
        stores.callback(pixels.close)
        stores.callback(masks.close)
        frame, info = _tile_one(
            source, reader, tumor.mask, config, tmp, pixels, masks, on_band or _nothing
        )
        frame.to_parquet(tmp / "rows.parquet", index=False)
        (tmp / "info.json").write_text(json.dumps(info), encoding="utf-8")


def _join_parts(
    sources: list[_Source], partial: Path, config: PatchifyConfig, out: Path
) -> tuple[list[pd.DataFrame], dict[str, dict[str, Any]], dict[str, Any], dict[str, str]]:
    """Append every part's stores to the final ones, in image order; also returns the
    stores' checksums."""
    first = np.load(_part(partial, 0) / PIXELS_FILE, mmap_mode="r")
    pixel_info = {"channels": int(first.shape[1]), "dtype": str(first.dtype)}
    side = config.input_size
    parts: list[pd.DataFrame] = []
    per_image: dict[str, dict[str, Any]] = {}
    with ExitStack() as stores:
        pixels = NpyAppender(out / PIXELS_FILE, first.shape[1:], first.dtype)
        masks = NpyAppender(out / MASKS_FILE, (side, side), np.uint8)
        stores.callback(pixels.close)
        stores.callback(masks.close)
        for index, source in enumerate(sources):
            part = _part(partial, index)
            for name, store in ((PIXELS_FILE, pixels), (MASKS_FILE, masks)):
                rows = np.load(part / name, mmap_mode="r")
                for start in range(0, len(rows), _COMPACT_CHUNK):
                    store.append(np.asarray(rows[start : start + _COMPACT_CHUNK]))
            parts.append(pd.read_parquet(part / "rows.parquet"))
            per_image[source.image_id] = json.loads((part / "info.json").read_text("utf-8"))
    checksums = {PIXELS_FILE: pixels.sha256, MASKS_FILE: masks.sha256}
    return parts, per_image, pixel_info, checksums


def _check_entry(entry: ImageEntry, config: PatchifyConfig) -> _Source:
    """Fail early on levels, patch sizes, mask encodings and annotation files (discovery
    already matched masks to images and checked their sizes)."""
    from unshortcut.io.readers import open_image

    with _opened(open_image(entry.image)) as reader:
        if config.level >= reader.level_count:
            raise UnshortcutError(
                f"{entry.image}: has {reader.level_count} level(s), --level {config.level} "
                "does not exist"
            )
        height, width = reader.level_shape(config.level)
        downsample = round(reader.level_downsample(config.level))
        grid = make_grid(height, width, config.patch_size, config.resolved_stride, str(entry.image))
        shape = reader.level_shape(0)
        pixel_kind = (int(reader.channels), str(np.dtype(reader.dtype)))
    if config.tissue_values is not None and entry.tissue is not None and entry.mask is not None:
        raise UnshortcutError(
            f"tissue/{entry.tissue.name}: --tissue-values already takes the tissue of image "
            f"{entry.image_id!r} from masks/{entry.mask.name}; use one of them"
        )
    with _opened(_open_tumor(entry, shape, config)) as tumor:
        return _Source(entry, shape, grid, downsample, tumor.source, tumor.warnings, pixel_kind)


def _open_tumor(entry: ImageEntry, shape: tuple[int, int], config: PatchifyConfig) -> TumorMask:
    from unshortcut.io.tumor import open_tumor_mask

    return open_tumor_mask(
        entry, shape, config.annotation_classes, config.tumor_values, config.tissue_values
    )


@contextmanager
def _opened(reader: Any) -> Iterator[Any]:
    try:
        yield reader
    finally:
        close = getattr(reader, "close", None)
        if close is not None:
            close()


def _nothing() -> None:
    """Per-band callback when nobody is watching."""


def _check_pixel_types(sources: list[_Source]) -> None:
    """One pixel store holds one channel count and pixel type: name the images that differ
    from the most common one (not merely from the first image read)."""
    kinds = Counter(s.pixel_kind for s in sources)
    if len(kinds) < 2:
        return
    (channels, dtype), count = kinds.most_common(1)[0]
    odd = [s for s in sources if s.pixel_kind != (channels, dtype)]
    shown = ", ".join(f"{s.image_path} ({s.pixel_kind[0]} x {s.pixel_kind[1]})" for s in odd[:3])
    more = f" and {len(odd) - 3} more" if len(odd) > 3 else ""
    raise UnshortcutError(
        f"{shown}{more}: channel count or pixel type differs from the other {count} image(s) "
        f"({channels} channel(s) of {dtype}); patchify them separately or convert them"
    )


@dataclass
class ImagePass:
    """One image's decode pass: every grid patch written in grid order, and per grid
    position (row-major) its level-0 corner, tumor fraction and tissue ratio."""

    ys: np.ndarray
    xs: np.ndarray
    tumor_fraction: np.ndarray
    tissue_ratio: np.ndarray
    tissue: TissueMask
    tissue_source: str
    thumbnail: np.ndarray | None
    """The block-mean thumbnail built during the pass (None when tissue came from
    elsewhere: a tissue/ mask, a label map, a pyramid level)."""
    thumbnail_downsample: int


def pass_image(
    entry: ImageEntry,
    reader: Any,
    mask: Any,
    grid: Grid,
    downsample: int,
    config: PatchifyConfig,
    pixel_out: BinaryIO,
    mask_out: BinaryIO,
    on_band: Callable[[], None] = _nothing,
) -> ImagePass:
    """Decode ``reader`` once, write its grid patches and masks, and measure tissue.

    Shared by ``patchify`` and ``predict``, so both cut, shrink and measure tissue
    identically. ``grid`` is at ``config.level``; ``downsample`` is its level-0 pixels
    per level pixel.
    """
    shape = reader.level_shape(0)
    tissue, tissue_source = _precomputed_tissue(entry, shape, grid, downsample, reader, config)
    tiled = tile_image(
        reader,
        mask,
        grid,
        config.level,
        downsample,
        config.input_size,
        pixel_out,
        mask_out,
        want_thumbnail=tissue is None,
        on_band=on_band,
    )
    if tissue is None:
        tissue = _detect_tissue(tiled.thumbnail, tiled.thumbnail_downsample, config)
        tissue_source = (
            f"detected ({config.tissue_method}) on a 1/{tiled.thumbnail_downsample} thumbnail"
        )
    ys, xs = (a.reshape(-1) * downsample for a in np.meshgrid(grid.ys, grid.xs, indexing="ij"))
    size = grid.size * downsample
    tissue_ratio = np.clip(np.asarray(tissue.fractions(ys, xs, size), float), 0, 1)
    return ImagePass(
        ys,
        xs,
        tiled.tumor_fraction,
        tissue_ratio,
        tissue,
        tissue_source,
        tiled.thumbnail,
        tiled.thumbnail_downsample,
    )


def _tile_one(
    source: _Source,
    reader: Any,
    mask: Any,
    config: PatchifyConfig,
    work: Path,
    pixels: NpyAppender,
    masks: NpyAppender,
    on_band: Callable[[], None],
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One image: decode pass, tissue ratios, --min-tissue, compaction, table rows."""
    grid, ds = source.grid, source.downsample
    pixel_tmp, mask_tmp = work / "pixels.raw", work / "masks.raw"
    with open(pixel_tmp, "wb") as pixel_out, open(mask_tmp, "wb") as mask_out:
        measured = pass_image(
            source.entry, reader, mask, grid, ds, config, pixel_out, mask_out, on_band
        )
    ys, xs, tissue = measured.ys, measured.xs, measured.tissue
    tissue_ratio, tissue_source = measured.tissue_ratio, measured.tissue_source
    keep = tissue_ratio >= config.min_tissue
    bad = _compact(pixel_tmp, pixels, keep)
    if bad is not None:
        raise UnshortcutError(
            f"{source.image_path}: holds NaN or infinite pixel values (first in the patch at "
            f"x={xs[bad]}, y={ys[bad]}); replace them (with 0, say) before patchify"
        )
    _compact(mask_tmp, masks, keep)
    labels = labels_from_fractions(measured.tumor_fraction, config.min_tumor_fraction)
    frame = pd.DataFrame(
        {
            "patch_id": [
                f"{source.image_id}@{x},{y}" for x, y in zip(xs[keep], ys[keep], strict=True)
            ],
            "image_id": source.image_id,
            "x": xs[keep],
            "y": ys[keep],
            "size": grid.size * ds,
            "level": config.level,
            "tumor_fraction": measured.tumor_fraction[keep],
            "tissue_ratio": tissue_ratio[keep],
            "label": labels[keep],
            "synthetic": False,
        }
    )
    kept_ratios = tissue_ratio[keep]
    constant = kept_ratios.size > 1 and float(np.ptp(kept_ratios)) == 0.0
    info = {
        "height": grid.height * ds,
        "width": grid.width * ds,
        "grid_patches": int(keep.size),
        "kept": int(keep.sum()),
        "tumor": int(labels[keep].sum()),
        "dropped_glass": int((~keep).sum()),
        "tumor_source": source.tumor_source,
        "tissue": tissue_source,
        "tissue_threshold": tissue.threshold,
        "tissue_polarity": tissue.polarity,
        "tissue_ratio_constant": float(kept_ratios[0]) if constant else None,
    }
    return frame, info


def _precomputed_tissue(
    entry: ImageEntry,
    shape: tuple[int, int],
    grid: Grid,
    ds: int,
    reader: Any,
    config: PatchifyConfig,
) -> tuple[TissueMask | None, str]:
    """A tissue mask that needs no pass over full-resolution pixels, when one exists.

    A tissue/ mask file wins, then the label map when ``--tissue-values`` names its
    tissue values; otherwise a pyramid level of at most ``PYRAMID_THUMBNAIL_SIDE``
    pixels a side serves as the thumbnail. Returns (None, "") when the thumbnail must
    be accumulated during tiling.
    """
    from unshortcut.tiling.tissue import thumbnail_of, tissue_from_mask_file

    resolution = ds * thumbnail_factor(grid.size, grid.stride, grid.height, grid.width)
    if entry.tissue is not None:
        tissue = tissue_from_mask_file(entry.tissue, shape, resolution)
        return tissue, f"mask file {entry.tissue.name}"
    if config.tissue_values is not None and entry.mask is not None:
        values, tumor = config.tissue_values, config.tumor_values or ()
        tissue = tissue_from_mask_file(entry.mask, shape, resolution, values, tumor)
        return tissue, f"label map {entry.mask.name}, values {', '.join(map(str, values))}"
    smallest = min(max(reader.level_shape(level)) for level in range(reader.level_count))
    if reader.level_count > 1 and smallest <= PYRAMID_THUMBNAIL_SIDE:
        thumbnail, downsample = thumbnail_of(reader, PYRAMID_THUMBNAIL_SIDE)
        tissue = _detect_tissue(thumbnail, downsample, config)
        return tissue, f"pyramid level 1/{downsample:.0f}"
    return None, ""


def _detect_tissue(
    thumbnail: np.ndarray | None, downsample: float, config: PatchifyConfig
) -> TissueMask:
    from unshortcut.tiling.tissue import detect_tissue_from_thumbnail

    assert thumbnail is not None
    return detect_tissue_from_thumbnail(
        thumbnail,
        downsample,
        method=config.tissue_method,  # type: ignore[arg-type]
        threshold=config.tissue_threshold,
        polarity=BACKGROUNDS[config.background],  # type: ignore[arg-type]
        min_object_px=config.min_object_size,
    )


def _input_warnings(sources: list[_Source], per_image: dict[str, dict[str, Any]]) -> list[str]:
    """What the user must hear about the inputs: tumor-free by default, annotation files
    that say something else than meant, and images whose tissue ratio is constant."""
    warnings = [w for source in sources for w in source.warnings]
    negatives = [s.image_id for s in sources if s.entry.mask is None and not s.entry.annotation]
    if negatives:
        warnings.append(
            f"{len(negatives)} image(s) without a mask or annotation count as tumor-free "
            f"(--missing-mask negative): {_some(negatives)}"
        )
    constant: dict[float, list[str]] = {}
    for image_id, info in per_image.items():
        if info["tissue_ratio_constant"] is not None:
            constant.setdefault(info["tissue_ratio_constant"], []).append(image_id)
    for value, ids in sorted(constant.items()):
        warnings.append(
            f"tissue_ratio is {value:.3f} on every kept patch of {len(ids)} image(s) "
            f"({_some(ids)}): no glass/background told apart from tissue there. Where all "
            "patches share one tissue ratio, tissue_ratio groups are empty on one side of "
            "any --tau and audit/train refuse it. If the images do show background, set "
            "--tissue-method threshold --tissue-threshold T --background bright|dark (or "
            "give tissue/ masks); otherwise group by another --attribute"
        )
    return warnings


def _some(ids: list[str]) -> str:
    """The first few ids of a list for a warning, then how many more."""
    more = len(ids) - _SHOWN_IDS
    return ", ".join(ids[:_SHOWN_IDS]) + (f" and {more} more" if more > 0 else "")


def _compact(raw: Path, store: NpyAppender, keep: np.ndarray) -> int | None:
    """Append the kept rows of a temporary grid-order file to the final store, chunk by chunk.

    Returns the grid index of the first patch (kept or not) holding NaN or inf, for
    floating-point pixels; such values would reach training as a diverging loss.
    """
    row_items = int(np.prod(store.row_shape))
    first_bad = None
    with open(raw, "rb") as handle:
        for start in range(0, keep.size, _COMPACT_CHUNK):
            chosen = keep[start : start + _COMPACT_CHUNK]
            rows = np.fromfile(handle, dtype=store.dtype, count=chosen.size * row_items)
            rows = rows.reshape(chosen.size, *store.row_shape)
            if first_bad is None and rows.dtype.kind == "f":
                finite = np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)
                if not finite.all():
                    first_bad = start + int(np.argmin(finite))
            store.append(rows[chosen])
    raw.unlink()
    return first_bad


def _columns(metadata: pd.DataFrame | None) -> list[str]:
    return [] if metadata is None else list(metadata.columns)


def _assemble_table(
    parts: list[pd.DataFrame], metadata: pd.DataFrame | None, config: PatchifyConfig
) -> pd.DataFrame:
    """All patches in store order, with metadata columns, patient ids and splits."""
    table = pd.concat(parts, ignore_index=True)
    if table.empty:
        raise UnshortcutError(
            f"--min-tissue: no patch holds at least {config.min_tissue:.0%} tissue; lower it"
        )
    meta_columns = [c for c in _columns(metadata) if c != "image_id"]
    if "synthetic" in meta_columns:  # a generator may mark its own images
        table = table.drop(columns="synthetic")
    if metadata is not None:
        table = table.merge(metadata, on="image_id", how="left", validate="many_to_one")
        table["synthetic"] = table["synthetic"].astype(bool)
    if "patient_id" in meta_columns:
        patient = table["patient_id"].astype("string")
        table["patient_id"] = patient.fillna(table["image_id"].astype("string")).astype(str)
    else:
        table["patient_id"] = table["image_id"]
    if "split" in meta_columns:
        table["split"] = table["split"].astype(str)
    else:
        region = config.region_size or 8 * int(table["size"].iloc[0])
        units = unit_keys(table, config.split_unit, region)  # type: ignore[arg-type]
        table["split"] = draw_splits(
            units, table["label"].to_numpy(), config.split_fractions, config.seed
        )
    first = list(REQUIRED_COLUMNS)
    rest = [c for c in table.columns if c not in first]
    return table[first + rest]


def _manifest(
    data_dir: Path,
    config: PatchifyConfig,
    table: pd.DataFrame,
    per_image: dict[str, dict[str, Any]],
    pixel_info: dict[str, Any],
    metadata: pd.DataFrame | None,
    checksums: dict[str, str],
) -> dict[str, Any]:
    parameters = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    parameters["stride"] = config.resolved_stride
    if config.split_unit == "region":
        parameters["region_size"] = config.region_size or 8 * int(table["size"].iloc[0])
    return {
        **base_manifest(
            table, pixel_info["channels"], pixel_info["dtype"], config.input_size, checksums
        ),
        "source": str(data_dir.resolve()),
        "parameters": parameters,
        "splits_from": "metadata.csv" if "split" in _columns(metadata) else config.split_unit,
        "images": per_image,
        "metadata_columns": [c for c in _columns(metadata) if c != "image_id"],
    }


def summary_rows(table: pd.DataFrame) -> list[tuple[str, ...]]:
    """Per split: patches, tumor, non-tumor, median tissue ratio of each class."""

    def median(values: pd.Series) -> str:
        return f"{values.median():.3f}" if len(values) else "-"

    rows = []
    for split in SPLITS:
        part = table[table["split"] == split]
        tumor, normal = part[part["label"] == 1], part[part["label"] == 0]
        rows.append(
            (
                split,
                str(len(part)),
                str(len(tumor)),
                str(len(normal)),
                median(tumor["tissue_ratio"]),
                median(normal["tissue_ratio"]),
            )
        )
    return rows
