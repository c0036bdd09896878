"""Real geometry, real texture: ERM from scratch, with HED stain jitter, and pretrained.

Builds (once, cached under bench/work/real-slides/) a slide set whose geometry and
texture are both real and whose annotations take the polygon path end to end:

* **layouts**: the CAMELYON17 lymph-node layouts of ../shared/data whose tissue is at
  least ``MIN_TUMOR_SHARE`` tumor (13 slides; the set needs enough tumor patches to
  rank anything), one layout cell drawn as ``CELL`` x ``CELL`` pixels;
* **annotations**: each layout's tumor traced to polygons (marching squares through
  the cell centres, as an annotator at thumbnail scale would draw them) and written as
  QuPath GeoJSON: ``patchify`` reads them through ``annotations/``;
* **texture**: tumor painted inside those polygons with crops of real BCSS tumor, the
  rest of the tissue with crops of real BCSS non-tumor tissue (BCSS masks say which),
  glass elsewhere. Splits are drawn per patient here (metadata.csv), and each split
  takes its crops from its own band of rows of every BCSS image (train the top 60%,
  validation the next 20%, test the last 20%), so no texture pixel is shared between
  splits.

Then ``patchify`` (128 px patches at 16 px input, tissue detected on the thumbnail) and,
with ResNet-18 and ERM, 3 seeds each of: scratch; scratch + HED jitter; starting from a
checkpoint pretrained (supervised, tumor vs non-tumor) on the OCDC oral-cavity patches,
which the texture is never painted from; the same + HED jitter. The checkpoint is
saved as a torchvision-style state dict (.pth) and loaded through ``pretrained`` as a
user would. Test metrics at the checkpoint selected by validation worst-group accuracy.

    python bench/real_slides.py [--epochs 4] [--seeds 3]

Writes bench/results/real_slides.json (a ``rows`` list, each metric {mean, std,
values}) and prints the Markdown section for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import shapely
import tifffile
import torch
from PIL import Image
from skimage.measure import find_contours

from common import format_pct
from robustness import machine, mean_std
from unshortcut.atomic import atomic_write_text
from unshortcut.config import load_config
from unshortcut.io.rasterise import PolygonMask
from unshortcut.runs import load_model, open_run
from unshortcut.tiling.patchify import PatchifyConfig, patchify
from unshortcut.tiling.patchset import PatchSet
from unshortcut.train import train

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parents[1] / "shared" / "data"
WORK = ROOT / "work" / "real-slides"
RESULTS = ROOT / "results" / "real_slides.json"

MIN_TUMOR_SHARE = 0.03
"""Layouts whose tissue is at least this share tumor (cells)."""
CELL = 64
"""Image pixels per layout cell (a CAMELYON17 layout cell is one 256 px tile at level 0)."""
CROP = 128
"""Side of the texture crops the canvas is tiled with."""
TILE = 512
"""TIFF tile side of the painted slides."""
SPLIT_ROWS = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}
"""Band of rows of every BCSS image each split takes its texture from."""
GLASS = np.array([236, 234, 240], np.int16)
NOISE = 3
"""Scanner-like noise on every pixel, in grey levels (as bench/patchify.py's slide)."""
PATCHES = PatchifyConfig(patch_size=128, input_size=16, background="bright")
"""BCSS is ~0.25 um/px: a 128 px patch is 32 um, input 16 px keeps nuclei ~4 px wide."""
OCDC_PATCHES = PatchifyConfig(patch_size=32, input_size=16, split_unit="image", seed=0)
"""OCDC is ~4x coarser than BCSS: 32 px there cover about what 128 px cover here."""
SETTINGS = {
    "scratch": {},
    "scratch + HED jitter": {"hed_jitter": 0.05},
    "OCDC-pretrained": {"pretrained": True},
    "OCDC-pretrained + HED jitter": {"pretrained": True, "hed_jitter": 0.05},
}
METRICS = ("balanced_accuracy", "worst_group_accuracy", "auroc", "robust_auroc")


# --------------------------------------------------------------------------- the set


def chosen_layouts() -> dict[str, np.ndarray]:
    """Layout label maps (0 glass, 1 tissue, 2 tumor) with enough tumor, by image id."""
    layouts = {}
    for path in sorted((SHARED / "camelyon17-layouts").glob("*.png")):
        cells = np.asarray(Image.open(path))
        if (cells == 2).sum() >= MIN_TUMOR_SHARE * (cells >= 1).sum():
            layouts[path.stem.removesuffix("_mask")] = cells
    return layouts


def assign_splits(layouts: dict[str, np.ndarray], seed: int = 0) -> dict[str, str]:
    """Patient-level splits, stratified by tumor share: in each block of five layouts
    (sorted by tumor share) three go to train, one to val, one to test."""
    share = {k: (v == 2).sum() / (v >= 1).sum() for k, v in layouts.items()}
    order = sorted(layouts, key=lambda k: -share[k])
    rng = np.random.default_rng(seed)
    splits: dict[str, str] = {}
    for start in range(0, len(order), 5):
        block = order[start : start + 5]
        names = ["val", "test", "train", "train", "train"][: len(block)]
        for image_id, split in zip(block, rng.permutation(names), strict=True):
            splits[image_id] = str(split)
    return splits


def trace_to_polygons(tumor: np.ndarray, scale: int) -> shapely.Geometry:
    """A cell mask's outline in image pixels: marching squares through cell centres,
    rings combined even-odd so that inner rings become holes."""
    contours = find_contours(np.pad(tumor.astype(float), 1), 0.5)
    rings = [
        shapely.Polygon(np.c_[(c[:, 1] - 0.5) * scale, (c[:, 0] - 0.5) * scale])
        for c in contours
        if len(c) >= 4
    ]
    return functools.reduce(shapely.symmetric_difference, rings, shapely.Polygon())


class TexturePool:
    """Crop positions of tumor and non-tumor BCSS texture, per split (row bands)."""

    def __init__(self) -> None:
        Image.MAX_IMAGE_PIXELS = None
        self.images: list[np.ndarray] = []
        self.positions: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
        for index, path in enumerate(sorted((SHARED / "bcss" / "images").glob("*.jpg"))):
            image = np.asarray(Image.open(path).convert("RGB"))
            tumor = np.asarray(Image.open(SHARED / "bcss" / "masks" / path.name).convert("L"))
            self.images.append(image)
            self._index(index, image, tumor > 127)

    def _index(self, index: int, image: np.ndarray, tumor: np.ndarray) -> None:
        height, width = tumor.shape
        grey = image.mean(axis=2)
        for split, (top, bottom) in SPLIT_ROWS.items():
            for y in range(int(top * height), int(bottom * height) - CROP, CROP // 4):
                for x in range(0, width - CROP, CROP // 4):
                    share = tumor[y : y + CROP, x : x + CROP].mean()
                    if grey[y : y + CROP, x : x + CROP].mean() > 215:
                        continue  # mostly fat or empty: reads as glass to tissue detection
                    label = 1 if share >= 0.9 else 0 if share <= 0.1 else None
                    if label is not None:
                        self.positions.setdefault((split, label), []).append((index, y, x))

    def crop(self, split: str, label: int, rng: np.random.Generator) -> np.ndarray:
        choices = self.positions[(split, label)]
        index, y, x = choices[rng.integers(len(choices))]
        crop = self.images[index][y : y + CROP, x : x + CROP]
        return np.rot90(crop[:, ::-1] if rng.random() < 0.5 else crop, rng.integers(4))


def _interpolation(coords: np.ndarray, n: int) -> np.ndarray:
    """(len(coords), n) bilinear weights of cell-centre samples at cell coordinates."""
    c = np.clip(coords, 0, n - 1)
    low = np.minimum(np.floor(c).astype(int), max(n - 2, 0))
    weight = c - low
    matrix = np.zeros((len(coords), n))
    matrix[np.arange(len(coords)), low] = 1 - weight
    matrix[np.arange(len(coords)), np.minimum(low + 1, n - 1)] += weight
    return matrix


def painted_tiles(
    cells: np.ndarray, tumor: PolygonMask, split: str, pool: TexturePool, seed: int
) -> Iterator[np.ndarray]:
    """Row-major (TILE, TILE, 3) uint8 tiles of one slide.

    Tissue: the layout's tissue cells interpolated bilinearly to pixels and cut at 0.5
    (smooth outlines), plus the annotated tumor. Texture: crops on a CROP grid, tumor
    inside the polygons (the same pixel rule patchify labels by), non-tumor elsewhere.
    """
    height, width = (side * CELL for side in cells.shape)
    tissue_cells = (cells >= 1).astype(np.float64)
    for ty in range(0, height, TILE):
        rows = _interpolation((np.arange(ty, ty + TILE) + 0.5) / CELL - 0.5, cells.shape[0])
        band = rows @ tissue_cells
        for tx in range(0, width, TILE):
            cols = _interpolation((np.arange(tx, tx + TILE) + 0.5) / CELL - 0.5, cells.shape[1])
            h, w = min(TILE, height - ty), min(TILE, width - tx)
            inside = np.zeros((TILE, TILE), bool)
            inside[:h, :w] = tumor.read_region(ty, tx, h, w)
            tissue = ((band @ cols.T) >= 0.5) | inside
            rng = np.random.default_rng([seed, ty, tx])
            pixels = np.broadcast_to(GLASS, (TILE, TILE, 3)).astype(np.int16)
            for label, where in ((0, tissue & ~inside), (1, inside)):
                if where.any():  # most tiles of a slide are glass: no texture drawn
                    texture = _texture(pool, split, label, rng)
                    pixels[where] = texture[where]
            pixels += rng.integers(-NOISE, NOISE + 1, pixels.shape, dtype=np.int16)
            yield np.clip(pixels, 0, 255).astype(np.uint8)


def _texture(pool: TexturePool, split: str, label: int, rng: np.random.Generator) -> np.ndarray:
    """A (TILE, TILE, 3) canvas of random crops of one class on a CROP grid."""
    canvas = np.empty((TILE, TILE, 3), np.uint8)
    for cy in range(0, TILE, CROP):
        for cx in range(0, TILE, CROP):
            canvas[cy : cy + CROP, cx : cx + CROP] = pool.crop(split, label, rng)
    return canvas


def build_data(data: Path) -> Path:
    """The slide set as a DATA folder (images/, annotations/, metadata.csv), cached."""
    done = data / ".complete"
    if done.exists():
        return data
    layouts = chosen_layouts()
    splits = assign_splits(layouts)
    pool = TexturePool()
    for folder in ("images", "annotations"):
        (data / folder).mkdir(parents=True, exist_ok=True)
    for number, (image_id, cells) in enumerate(layouts.items()):
        shape = (cells.shape[0] * CELL, cells.shape[1] * CELL)
        region = trace_to_polygons(cells == 2, CELL)
        feature = {
            "type": "Feature",
            "geometry": shapely.geometry.mapping(region),
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
        }
        document = {"type": "FeatureCollection", "features": [feature]}
        (data / "annotations" / f"{image_id}.geojson").write_text(json.dumps(document))
        tiles = painted_tiles(cells, PolygonMask(region, shape), splits[image_id], pool, number)
        tifffile.imwrite(
            data / "images" / f"{image_id}.tif",
            tiles,
            shape=(*shape, 3),
            dtype=np.uint8,
            tile=(TILE, TILE),
            photometric="rgb",
            compression="jpeg",
            compressionargs={"level": 90},
        )
    metadata = pd.DataFrame(
        {
            "image_id": list(layouts),
            "patient_id": [k.split("_node")[0] for k in layouts],
            "split": [splits[k] for k in layouts],
        }
    )
    metadata.to_csv(data / "metadata.csv", index=False)
    done.touch()
    return data


def example_figure(data: Path, patches: Path, out: Path) -> None:
    """A thumbnail of one painted slide beside a few of its patches (docs figure)."""
    from unshortcut.io.readers import open_image
    from unshortcut.tiling.tissue import thumbnail_of

    patchset = PatchSet.open(patches)
    table = patchset.table
    image_id = table.groupby("image_id")["label"].mean().idxmax()
    with open_image(data / "images" / f"{image_id}.tif") as reader:
        thumb, _ = thumbnail_of(reader, 600)
    full = table[(table["image_id"] == image_id) & (table["tissue_ratio"] > 0.95)]
    tumor = full["tumor_fraction"].to_numpy()
    picks = [full.index[tumor > 0.95][:8], full.index[tumor == 0][:8]]  # tumor row, then not
    tiles = [np.concatenate([np.asarray(patchset.pixels[i]).transpose(1, 2, 0) for i in p], 1)
             for p in picks]  # fmt: skip
    strip = np.concatenate(tiles, 0)
    strip = np.asarray(Image.fromarray(strip).resize((strip.shape[1] * 6, strip.shape[0] * 6),
                                                     Image.NEAREST))  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(thumb.astype(np.uint8)).save(out.with_name(out.stem + "-slide.png"))
    Image.fromarray(strip).save(out)


# ---------------------------------------------------------------------- pretraining


def pretrained_checkpoint(work: Path, epochs: int, threads: int) -> Path:
    """ResNet-18 trained on OCDC (tumor vs non-tumor), backbone saved torchvision-style."""
    path = work / "ocdc-resnet18.pth"
    if path.is_file():
        return path
    ocdc = work / "ocdc-patches"
    if not (ocdc / "manifest.json").is_file():
        patchify(SHARED / "ocdc", ocdc, OCDC_PATCHES, overwrite=True)
    config = load_config(
        None, patches=ocdc, out=work / "ocdc-run", method="cb_erm", model="resnet18",
        attributes=["none"], epochs=epochs, seed=0, num_threads=threads, bootstrap=0,
        select_by=["balanced_accuracy"], device="cpu",
    )  # fmt: skip
    run = train(config, overwrite=True, progress=False)
    model = load_model(open_run(run))
    # MONAI's ResNet uses torchvision's module names: the backbone is the state dict.
    torch.save(model.backbone.state_dict(), path)
    return path


# ---------------------------------------------------------------------------- runs


def run_setting(
    name: str, changes: dict[str, Any], patches: Path, checkpoint: Path, args: argparse.Namespace
) -> list[Path]:
    runs = []
    for seed in range(args.seeds):
        out = WORK / "runs" / name.replace(" ", "").replace("+", "-") / f"seed{seed}"
        if not (out / "metrics.json").is_file():
            options = dict(changes)
            if options.get("pretrained"):
                options["pretrained"] = str(checkpoint)
            config = load_config(
                None, patches=patches, out=out, method="erm", model="resnet18",
                epochs=args.epochs, seed=seed, num_threads=args.threads, bootstrap=200,
                device="cpu", **options,
            )  # fmt: skip
            start = time.perf_counter()
            train(config, overwrite=True, progress=False)
            seconds = time.perf_counter() - start
            record_seconds(out, seconds)
            print(f"{name} seed {seed}: {seconds:.0f} s", flush=True)
        runs.append(out)
    return runs


def record_seconds(run: Path, seconds: float) -> None:
    """Training wall time per run, kept beside the runs (reused runs keep theirs)."""
    path = WORK / "run-seconds.json"
    times = json.loads(path.read_text()) if path.is_file() else {}
    times[str(run.relative_to(WORK))] = seconds
    atomic_write_text(path, json.dumps(times, indent=2) + "\n")


def run_seconds(run: Path) -> float | None:
    path = WORK / "run-seconds.json"
    times = json.loads(path.read_text()) if path.is_file() else {}
    return times.get(str(run.relative_to(WORK)))


def pretraining_summary(work: Path) -> dict[str, Any]:
    """How well the OCDC checkpoint's own task was learned (its run's metrics)."""
    metrics = json.loads((work / "ocdc-run" / "metrics.json").read_text())
    return {
        "method": "cb_erm",
        "patches": counts(work / "ocdc-patches"),
        **{split: {key: metrics[split][key] for key in ("balanced_accuracy", "auroc")}
           for split in ("val", "test")},
    }  # fmt: skip


def summarize(name: str, changes: dict[str, Any], runs: list[Path]) -> dict[str, Any]:
    tests = [json.loads((run / "metrics.json").read_text())["test"] for run in runs]
    return {
        "setting": name,
        "method": "erm",
        "model": "resnet18",
        "hed_jitter": changes.get("hed_jitter", 0.0),
        "pretrained": "ocdc-resnet18.pth" if changes.get("pretrained") else None,
        "criterion": "worst_group_accuracy",
        "runs": [str(r) for r in runs],
        **{key: mean_std([t.get(key) for t in tests]) for key in METRICS},
        "train_seconds": mean_std([run_seconds(r) for r in runs]),
        "test_groups": {
            group: {
                "n": tests[0]["groups"][group]["n"],
                "accuracy": mean_std([t["groups"][group]["accuracy"] for t in tests]),
            }
            for group in tests[0]["groups"]
        },
    }


def counts(patches: Path) -> dict[str, dict[str, int]]:
    table = PatchSet.open(patches).table
    return {
        split: {"patches": int((part := table[table["split"] == split]).shape[0]),
                "tumor": int(part["label"].sum()), "images": int(part["image_id"].nunique())}
        for split in ("train", "val", "test")
    }  # fmt: skip


def _training_minutes(rows: list[dict[str, Any]]) -> float:
    return sum(v for row in rows for v in row["train_seconds"]["values"] if v) / 60


def markdown(result: dict[str, Any]) -> str:
    c = result["counts"]
    runs = sum(len(row["runs"]) for row in result["rows"])
    lines = [
        "| setting | test BCA | test WGA | test AUROC | test robust AUROC |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        cells = " | ".join(format_pct(row[key]) for key in METRICS)
        lines.append(f"| {row['setting']} | {cells} |")
    split_text = ", ".join(
        f"{s} {c[s]['patches']} ({c[s]['tumor']} tumor, {c[s]['images']} slides)" for s in c
    )
    return "\n".join(
        [
            f"Patches per split: {split_text}.",
            "",
            *lines,
            "",
            f"Per-seed values: `bench/results/real_slides.json`. Command: `{result['command']}`",
            f"({result['machine']}; this invocation {result['wall']}; training "
            f"{_training_minutes(result['rows']):.0f} min over {runs} runs, timed when run).",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--pretrain-epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    start = time.perf_counter()
    data = build_data(WORK / "data")
    patches = WORK / "patches"
    if not (patches / "manifest.json").is_file():
        patchify(data, patches, PATCHES, overwrite=True)
    example_figure(data, patches, ROOT.parent / "docs" / "img" / "real-slides-patches.png")
    print(f"set ready after {time.perf_counter() - start:.0f} s: {counts(patches)}", flush=True)
    checkpoint = pretrained_checkpoint(WORK, args.pretrain_epochs, args.threads)
    rows = [
        summarize(name, changes, run_setting(name, changes, patches, checkpoint, args))
        for name, changes in SETTINGS.items()
    ]
    result = {
        "settings": {"epochs": args.epochs, "pretrain_epochs": args.pretrain_epochs,
                     "seeds": args.seeds, "patch_size": PATCHES.patch_size,
                     "input_size": PATCHES.input_size, "cell_px": CELL,
                     "layouts_min_tumor_share": MIN_TUMOR_SHARE},
        "counts": counts(patches),
        "pretraining": pretraining_summary(WORK),
        "rows": rows,
        "command": "python bench/real_slides.py "
        + f"--epochs {args.epochs} --seeds {args.seeds} --threads {args.threads}",
        "machine": machine(),
        "wall": f"{(time.perf_counter() - start) / 60:.0f} min wall time",
    }  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    atomic_write_text(RESULTS, json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
