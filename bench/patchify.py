"""Benchmark: `patchify` against raw decoding and the common per-patch approach.

Generates (once, cached under bench/work/) a large 3-channel tiled JPEG TIFF that looks
like tissue on glass, plus its tumor mask, then measures three variants, each in its own
subprocess so that peak resident memory (``os.wait4`` rusage of that child) belongs to
that variant alone:

  raw        read every tile of the image once (project reader, band by band), nothing else
  patchify   the library's ``patchify`` on the image and mask (tiling, resizing, tissue
             detection, filtering, splits, writing the patch set)
  per-patch  for every grid patch: open the slide, read one region, close; the same for
             the mask; area-resize both to the input size (the same block-sum code
             patchify uses, so only the reading pattern differs) and compute the tumor
             fraction

Throughput is the covered image area in megapixels divided by the variant's own wall
time (imports excluded). Usage::

    python bench/patchify.py                 # 20480 x 20480, patch 256, input 64
    python bench/patchify.py --size 4096     # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

WORK = Path(__file__).resolve().parent / "work"
NOISE = 3
"""Scanner noise of the benchmark slide, in grey levels (see ``slide_tiles``)."""


# --- synthetic slide -----------------------------------------------------------------


def _blob_field(cells: int, n_blobs: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth field on a (cells + 1)^2 lattice: a sum of Gaussian blobs, max about 1."""
    yy, xx = np.mgrid[0 : cells + 1, 0 : cells + 1].astype(np.float32)
    field = np.zeros_like(yy)
    for cy, cx, sigma in zip(
        rng.uniform(0.15, 0.85, n_blobs) * cells,
        rng.uniform(0.15, 0.85, n_blobs) * cells,
        rng.uniform(0.04, 0.12, n_blobs) * cells,
        strict=True,
    ):
        field += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    return field / field.max()


def _textures(tile: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """A few (tile, tile) nuclei-like textures in [0, 1], reused across tiles."""
    import torch
    import torch.nn.functional as F

    coarse = torch.from_numpy(rng.random((count, 1, tile // 8, tile // 8), dtype=np.float32))
    smooth = F.interpolate(coarse, size=(tile, tile), mode="bilinear", align_corners=False)
    fine = torch.from_numpy(rng.random((count, 1, tile, tile), dtype=np.float32))
    return (0.7 * smooth + 0.3 * fine)[:, 0].numpy()


def slide_tiles(
    size: int, tile: int, seed: int
) -> tuple[Iterator[np.ndarray], Iterator[np.ndarray]]:
    """Row-major image tiles (tile, tile, 3) uint8 and mask tiles (tile, tile) uint8.

    Tissue and tumor are smooth blob fields on a 64-px lattice, bilinearly upsampled per
    tile; colour is glass where there is no tissue and a pink/purple texture inside.
    Every pixel gets scanner-like noise of +-``NOISE`` levels, so that no two image tiles
    compress alike: the reader decodes identical tiles once, and blank glass tiles would
    otherwise make every variant look faster than on a real slide.
    """
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    cell = 64
    cells = size // cell
    tissue = _blob_field(cells, 12, rng)
    tumor = _blob_field(cells, 4, rng) * (tissue > 0.45)
    textures = _textures(tile, 8, rng)
    glass = np.array([242, 240, 245], np.float32)
    pink = np.array([225, 150, 190], np.float32)
    purple = np.array([110, 50, 140], np.float32)
    per_tile = tile // cell

    def upsample(field: np.ndarray, ty: int, tx: int) -> np.ndarray:
        block = field[
            ty * per_tile : (ty + 1) * per_tile + 1, tx * per_tile : (tx + 1) * per_tile + 1
        ]
        tensor = torch.from_numpy(np.ascontiguousarray(block))[None, None]
        up = F.interpolate(tensor, size=(tile + 1, tile + 1), mode="bilinear", align_corners=True)
        return up[0, 0, :tile, :tile].numpy()

    def image() -> Iterator[np.ndarray]:
        for ty in range(size // tile):
            for tx in range(size // tile):
                t = np.clip((upsample(tissue, ty, tx) - 0.35) * 8, 0, 1)[..., None]
                u = upsample(tumor, ty, tx)[..., None]
                texture = textures[(ty * 7 + tx * 3) % len(textures)][..., None]
                stain = pink + (purple - pink) * np.clip(texture * (0.6 + 0.8 * u), 0, 1)
                pixels = glass * (1 - t) + stain * t
                noise = rng.integers(-NOISE, NOISE + 1, pixels.shape, dtype=np.int16)
                yield np.clip(pixels.astype(np.int16) + noise, 0, 255).astype(np.uint8)

    def mask() -> Iterator[np.ndarray]:
        for ty in range(size // tile):
            for tx in range(size // tile):
                yield (upsample(tumor, ty, tx) > 0.5).astype(np.uint8) * 255

    return image(), mask()


def ensure_slide(size: int, tile: int, seed: int) -> Path:
    """DATA folder with images/slide.tif and masks/slide.tif, generated once and cached."""
    import tifffile

    data = WORK / f"slide-{size}-t{tile}-s{seed}-noise{NOISE}"
    done = data / ".complete"
    if done.exists():
        return data
    (data / "images").mkdir(parents=True, exist_ok=True)
    (data / "masks").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    image_tiles, mask_tiles = slide_tiles(size, tile, seed)
    tifffile.imwrite(
        data / "images" / "slide.tif",
        image_tiles,
        shape=(size, size, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": 85},
    )
    tifffile.imwrite(
        data / "masks" / "slide.tif",
        mask_tiles,
        shape=(size, size),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="minisblack",
        compression="zlib",
    )
    done.touch()
    print(f"generated {data} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return data


# --- variants (each runs in its own subprocess) --------------------------------------


def run_raw(data: Path, patch: int, input_size: int) -> float:
    from unshortcut.io.readers import iter_bands, open_image

    start = time.perf_counter()
    reader = open_image(data / "images" / "slide.tif")
    for _ in iter_bands(reader, patch):
        pass
    reader.close()
    return time.perf_counter() - start


def run_patchify(data: Path, patch: int, input_size: int) -> float:
    import shutil

    import pyarrow.parquet  # noqa: F401 - imports are start-up cost, not throughput
    import skimage.filters
    import skimage.morphology  # noqa: F401

    import unshortcut.io.discover
    import unshortcut.tiling.tissue  # noqa: F401
    from unshortcut.tiling.patchify import PatchifyConfig, patchify

    out = WORK / f"out-{data.name}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    patchify(data, out, PatchifyConfig(patch_size=patch, input_size=input_size), overwrite=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def run_per_patch(data: Path, patch: int, input_size: int) -> float:
    from unshortcut.blocks import block_sum
    from unshortcut.io.readers import open_image
    from unshortcut.tiling.grid import make_grid, to_dtype, tumor_mask_uint8

    image, mask = data / "images" / "slide.tif", data / "masks" / "slide.tif"
    start = time.perf_counter()
    probe = open_image(image)
    grid = make_grid(*probe.level_shape(0), patch, patch, str(image))
    probe.close()
    factor = patch // input_size
    for y in grid.ys.tolist():
        for x in grid.xs.tolist():
            reader = open_image(image)
            pixels = reader.read_region(y, x, patch, patch)
            reader.close()
            reader = open_image(mask)
            tumor = reader.read_region(y, x, patch, patch)[..., 0] > 127
            reader.close()
            to_dtype(block_sum(pixels, factor) / factor**2, pixels.dtype)
            tumor_mask_uint8(block_sum(tumor, factor) / factor**2)
            float(tumor.mean())
    return time.perf_counter() - start


VARIANTS = {"raw": run_raw, "patchify": run_patchify, "per-patch": run_per_patch}


def measure(variant: str, data: Path, patch: int, input_size: int) -> tuple[float, float, float]:
    """(seconds, CPU seconds, peak RSS in MB) of one variant run in a fresh subprocess.

    CPU seconds cover the whole child (imports included); wall seconds only the work.
    """
    command = [sys.executable, __file__, "--variant", variant, "--data", str(data)]
    command += ["--patch", str(patch), "--input", str(input_size)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"variant {variant} failed with exit code {child.returncode}")
    cpu = usage.ru_utime + usage.ru_stime
    return json.loads(output)["seconds"], cpu, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=20480, help="image side in pixels")
    parser.add_argument("--tile", type=int, default=512, help="TIFF tile side")
    parser.add_argument("--patch", type=int, default=256, help="patch size")
    parser.add_argument("--input", type=int, default=64, help="input size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        seconds = VARIANTS[args.variant](args.data, args.patch, args.input)
        print(json.dumps({"seconds": seconds}))
        return
    data = ensure_slide(args.size, args.tile, args.seed)
    megapixels = (args.size // args.patch * args.patch) ** 2 / 1e6
    results = {name: measure(name, data, args.patch, args.input) for name in VARIANTS}
    speed = {name: megapixels / seconds for name, (seconds, _, _) in results.items()}
    print(
        f"image {args.size} x {args.size} x 3 uint8, tiled {args.tile} JPEG TIFF; "
        f"patch {args.patch}, input {args.input}; {os.cpu_count()} CPU cores\n"
    )
    print("| variant | seconds | megapixels/s | CPU seconds (whole process) | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    for name, (seconds, cpu, rss) in results.items():
        print(f"| {name} | {seconds:.1f} | {speed[name]:.1f} | {cpu:.1f} | {rss:.0f} |")
    print()
    print(f"patchify / raw decode speed: {speed['patchify'] / speed['raw']:.2f}x (floor 0.5x)")
    print(f"patchify / per-patch speed: {speed['patchify'] / speed['per-patch']:.1f}x (floor 5x)")
    print(f"patchify peak RSS: {results['patchify'][2]:.0f} MB (floor < 2048 MB)")


if __name__ == "__main__":
    main()
