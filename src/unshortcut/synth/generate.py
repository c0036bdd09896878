"""Plan a synthetic dataset, render each image band by band, and write a DATA folder.

Planning (patients, sites, which images hold tumor, which layout each paints) is
cheap and happens up front from the master seed; each image then renders from its
own child seed, so images can be written in parallel and any one of them can be
regenerated alone. Pixels are produced in bands of :data:`BAND` rows and streamed
into a tiled, compressed TIFF, so memory stays bounded for 20,000+ px images.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from threadpoolctl import threadpool_limits

from unshortcut import __version__
from unshortcut.atomic import atomic_directory, atomic_write_text
from unshortcut.synth.config import RECOMMENDED_PATCHIFY, SynthConfig
from unshortcut.synth.geometry import BaseGeometry, carve, draw_geometry
from unshortcut.synth.layouts import (
    layout_patient,
    layout_shape,
    list_layouts,
    painted_geometry,
    read_layout,
)
from unshortcut.synth.texture import halo, render_texture

BAND = 512
"""Rows (and columns) rendered at once; also the unit of progress."""
TILE = 256
"""TIFF tile side."""
PNG_MAX_SIDE = 8192
"""Masks of images up to this side are PNG; larger ones are tiled TIFF."""
SPLIT_SHARES = (("train", 0.6), ("val", 0.2), ("test", 0.2))


@dataclass(frozen=True)
class ImagePlan:
    """Everything needed to render one image independently of the others."""

    image_id: str
    patient_id: str
    site: int
    seed: int
    has_tumor: bool
    shape: tuple[int, int]
    gain: tuple[float, ...]
    offset: tuple[float, ...]
    layout: Path | None = None
    split: str | None = None

    def metadata(self) -> dict[str, str]:
        """The image's row of metadata.csv."""
        row = {
            "image_id": self.image_id,
            "patient_id": self.patient_id,
            "site": f"site_{self.site}",
        }
        if self.layout is not None:
            row["layout"] = self.layout.stem
        if self.split is not None:
            row["split"] = self.split
        return row


@dataclass
class SynthImage:
    """One rendered image held in memory (for small images, tests and figures)."""

    plan: ImagePlan
    image: np.ndarray
    tumor: np.ndarray
    tissue: np.ndarray


@dataclass
class SynthSummary:
    """What :func:`generate_dataset` wrote."""

    out: Path
    plans: list[ImagePlan]
    images: list[dict[str, object]] = field(default_factory=list)


def _child_seed(config: SynthConfig, *key: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(config.seed, spawn_key=key)


def plan_dataset(config: SynthConfig) -> list[ImagePlan]:
    """Assign ids, patients, tumor status, layouts, sites and site shifts to images."""
    rng = np.random.default_rng(_child_seed(config, 1))
    n = config.images
    seeds = [int(_child_seed(config, 0, i).generate_state(1)[0]) for i in range(n)]
    layouts: list[Path | None] = [None] * n
    if config.layouts is not None:
        files = list_layouts(config.layouts)
        order = rng.permutation(len(files))
        layouts = [files[order[i % len(files)]] for i in range(n)]
        labels = [read_layout(path) for path in layouts]
        has_tumor = [bool((lab == 2).any()) for lab in labels]
        shapes = [layout_shape(lab, config.size) for lab in labels]
        patients = [layout_patient(path) for path in layouts]
    else:
        n_tumor = round(config.tumor_prevalence * n)
        has_tumor = list(np.isin(np.arange(n), rng.permutation(n)[:n_tumor]))
        shapes = [(config.size, config.size)] * n
        patients = [f"patient_{i // config.images_per_patient:03d}" for i in range(n)]
    sites = _assign_sites(config, patients, has_tumor, rng)
    splits = _assign_splits(patients, rng) if config.write_split else {}
    plans = []
    for i in range(n):
        site_rng = np.random.default_rng(_child_seed(config, 2, sites[patients[i]]))
        shift = config.site_shift
        gain = 1.0 + shift * site_rng.uniform(-1, 1, size=config.channels)
        offset = 0.1 * shift * site_rng.uniform(-1, 1, size=config.channels)
        brightness = np.random.default_rng(seeds[i]).uniform(0.95, 1.05)
        plans.append(
            ImagePlan(
                image_id=f"synth_{i:03d}",
                patient_id=patients[i],
                site=sites[patients[i]],
                seed=seeds[i],
                has_tumor=bool(has_tumor[i]),
                shape=shapes[i],
                gain=tuple(float(g) for g in gain * brightness),
                offset=tuple(float(o) for o in offset),
                layout=layouts[i],
                split=splits.get(patients[i]),
            )
        )
    return plans


def _assign_sites(
    config: SynthConfig, patients: list[str], has_tumor: list[bool], rng: np.random.Generator
) -> dict[str, int]:
    """Balanced sites per patient; with probability ``site_label_correlation`` a patient
    with tumor goes to site 0 and one without to the last site instead."""
    unique = list(dict.fromkeys(patients))
    tumor = {p: any(t for q, t in zip(patients, has_tumor, strict=True) if q == p) for p in unique}
    order = rng.permutation(len(unique))
    sites = {p: int(order[k] % config.sites) for k, p in enumerate(unique)}
    for p in unique:
        if rng.random() < config.site_label_correlation:
            sites[p] = 0 if tumor[p] else config.sites - 1
    return sites


def _assign_splits(patients: list[str], rng: np.random.Generator) -> dict[str, str]:
    """Patient-level train/val/test split in :data:`SPLIT_SHARES` proportions."""
    unique = list(dict.fromkeys(patients))
    order = [unique[k] for k in rng.permutation(len(unique))]
    bounds = np.round(np.cumsum([share for _, share in SPLIT_SHARES]) * len(unique)).astype(int)
    names = np.searchsorted(bounds, np.arange(len(unique)), side="right")
    return {
        p: SPLIT_SHARES[min(k, len(SPLIT_SHARES) - 1)][0] for p, k in zip(order, names, strict=True)
    }


def build_geometry(config: SynthConfig, plan: ImagePlan) -> BaseGeometry:
    """The tissue/tumor geometry of one image (procedural or painted on a layout)."""
    if plan.layout is not None:
        return painted_geometry(
            read_layout(plan.layout), config.size, plan.seed, config.border_roughness
        )
    return draw_geometry(config, plan.shape, plan.seed, plan.has_tumor)


def single_threaded_blas() -> threadpool_limits:
    """Rendering does many small matrix products, where BLAS threads only contend."""
    return threadpool_limits(limits=1, user_api="blas")


def _quantise(image: np.ndarray, plan: ImagePlan, dtype: str) -> np.ndarray:
    """Apply the site's per-channel gain and offset, clip to 0..1 and store as ``dtype``."""
    shifted = image * np.asarray(plan.gain, np.float32) + np.asarray(plan.offset, np.float32)
    top = np.iinfo(dtype).max
    return np.rint(np.clip(shifted, 0.0, 1.0) * top).astype(dtype)


def iter_bands(
    config: SynthConfig, plan: ImagePlan, geometry: BaseGeometry
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (first row, image, tumor, tissue) for each band of :data:`BAND` rows."""
    height, width = plan.shape
    margin = halo(config)
    for y0 in range(0, height, BAND):
        y1 = min(y0 + BAND, height)
        image = np.empty((y1 - y0, width, config.channels), dtype=config.dtype)
        tumor = np.empty((y1 - y0, width), dtype=bool)
        tissue = np.empty((y1 - y0, width), dtype=bool)
        for x0 in range(0, width, BAND):
            x1 = min(x0 + BAND, width)
            ys = np.arange(y0 - margin, y1 + margin, dtype=np.float64)
            xs = np.arange(x0 - margin, x1 + margin, dtype=np.float64)
            window = carve(geometry, config, ys, xs)
            pixels = render_texture(window, config, ys, xs, plan.seed)
            inner = (slice(margin, margin + y1 - y0), slice(margin, margin + x1 - x0))
            image[:, x0:x1] = _quantise(pixels[inner], plan, config.dtype)
            tumor[:, x0:x1] = window.tumor[inner]
            tissue[:, x0:x1] = window.tissue[inner]
        yield y0, image, tumor, tissue


def synthesize_image(config: SynthConfig, index: int = 0) -> SynthImage:
    """Render image ``index`` of the dataset ``config`` describes, in memory.

    Byte-identical to the pixels :func:`generate_dataset` writes for that image.
    """
    plan = plan_dataset(config)[index]
    with single_threaded_blas():
        bands = list(iter_bands(config, plan, build_geometry(config, plan)))
    return SynthImage(
        plan=plan,
        image=np.concatenate([band[1] for band in bands]),
        tumor=np.concatenate([band[2] for band in bands]),
        tissue=np.concatenate([band[3] for band in bands]),
    )


def _tiles(bands: Iterator[np.ndarray], width: int) -> Iterator[np.ndarray]:
    """Cut bands (a multiple of TILE rows, except the last) into row-major TIFF tiles."""
    for band in bands:
        padded_rows = -(-band.shape[0] // TILE) * TILE
        padded_cols = -(-width // TILE) * TILE
        pad = [(0, padded_rows - band.shape[0]), (0, padded_cols - width)]
        band = np.pad(band, pad + [(0, 0)] * (band.ndim - 2))
        for ty in range(0, padded_rows, TILE):
            for tx in range(0, padded_cols, TILE):
                yield band[ty : ty + TILE, tx : tx + TILE]


def _write_tiff(path: Path, bands: Iterator[np.ndarray], shape: tuple, dtype: str, codec: str):
    tifffile.imwrite(
        path,
        data=_tiles(bands, shape[1]),
        shape=shape,
        dtype=dtype,
        tile=(TILE, TILE),
        photometric="minisblack",
        planarconfig="contig" if len(shape) == 3 else None,
        compression=None if codec == "none" else codec,
        metadata=None,
    )


def _write_mask(path_stem: Path, mask: np.ndarray) -> Path:
    """0/255 mask: PNG up to :data:`PNG_MAX_SIDE`, tiled zlib TIFF above."""
    values = mask.astype(np.uint8) * np.uint8(255)
    if max(mask.shape) <= PNG_MAX_SIDE:
        path = path_stem.with_suffix(".png")
        Image.fromarray(values).save(path, optimize=False)
    else:
        path = path_stem.with_suffix(".tif")
        rows = (values[y : y + BAND] for y in range(0, values.shape[0], BAND))
        _write_tiff(path, rows, values.shape, "uint8", "zlib")
    return path


def write_image(
    config: SynthConfig,
    plan: ImagePlan,
    out: Path,
    on_band: Callable[[], None] | None = None,
) -> dict[str, object]:
    """Render one image into ``out`` (images/, masks/, tissue/); returns its summary."""
    height, width = plan.shape
    scratch = out / ".scratch" / plan.image_id
    scratch.mkdir(parents=True)
    # Masks are collected on disk while the image streams into its TIFF, then written.
    tumor = np.lib.format.open_memmap(scratch / "tumor.npy", "w+", bool, (height, width))
    tissue = np.lib.format.open_memmap(scratch / "tissue.npy", "w+", bool, (height, width))

    def image_bands() -> Iterator[np.ndarray]:
        for y0, image, tumor_band, tissue_band in iter_bands(
            config, plan, build_geometry(config, plan)
        ):
            tumor[y0 : y0 + image.shape[0]] = tumor_band
            tissue[y0 : y0 + image.shape[0]] = tissue_band
            if on_band is not None:
                on_band()
            yield image if config.channels > 1 else image[..., 0]

    shape = (height, width, config.channels) if config.channels > 1 else (height, width)
    with single_threaded_blas():
        _write_tiff(
            out / "images" / f"{plan.image_id}.tif",
            image_bands(),
            shape,
            config.dtype,
            config.compression,
        )
    _write_mask(out / "masks" / plan.image_id, tumor)
    if config.write_tissue:
        _write_mask(out / "tissue" / plan.image_id, tissue)
    tissue_px = int(np.count_nonzero(tissue))
    summary = {
        "image_id": plan.image_id,
        "height": height,
        "width": width,
        "has_tumor": plan.has_tumor,
        "tissue_fraction": round(tissue_px / (height * width), 6),
        "tumor_fraction_of_tissue": round(int(np.count_nonzero(tumor)) / max(tissue_px, 1), 6),
    }
    shutil.rmtree(scratch)  # the open memmaps stay valid until they are dropped (POSIX)
    return summary


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
    )


def generate_dataset(
    config: SynthConfig,
    out: Path,
    overwrite: bool = False,
    workers: int = 1,
    show_progress: bool = True,
) -> SynthSummary:
    """Write a DATA folder (images/, masks/, tissue/, metadata.csv, synth.json) to ``out``.

    The folder appears only when every image is written (atomic rename). With
    ``workers`` > 1 images render in separate processes; the files are the same.
    """
    plans = plan_dataset(config)
    summary = SynthSummary(out=Path(out), plans=plans)
    with atomic_directory(Path(out), overwrite=overwrite) as tmp:
        for folder in ("images", "masks", *(["tissue"] if config.write_tissue else [])):
            (tmp / folder).mkdir()
        with _progress() as progress:
            progress.disable = not show_progress
            tasks = {
                p.image_id: progress.add_task(p.image_id, total=-(-p.shape[0] // BAND))
                for p in plans
            }
            results: dict[str, dict[str, object]] = {}
            if workers <= 1:
                for p in plans:
                    advance = functools.partial(progress.advance, tasks[p.image_id])
                    results[p.image_id] = write_image(config, p, tmp, advance)
            else:
                with ProcessPoolExecutor(max_workers=workers) as pool:
                    futures = {pool.submit(write_image, config, p, tmp): p for p in plans}
                    for future in as_completed(futures):
                        p = futures[future]
                        results[p.image_id] = future.result()
                        progress.update(tasks[p.image_id], completed=-(-p.shape[0] // BAND))
        shutil.rmtree(tmp / ".scratch", ignore_errors=True)
        summary.images = [results[p.image_id] for p in plans]
        pd.DataFrame([p.metadata() for p in plans]).to_csv(tmp / "metadata.csv", index=False)
        record = {
            "tool": "unshortcut synth",
            "version": __version__,
            "config": config.model_dump(mode="json"),
            "channels": config.channel_names,
            "patchify": RECOMMENDED_PATCHIFY,
            "images": summary.images,
        }
        atomic_write_text(tmp / "synth.json", json.dumps(record, indent=2) + "\n")
    return summary
