"""Throughput of stain augmentation and normalisation (images per second, CPU).

Rows:

- hed_jitter: :class:`unshortcut.stain.HedJitter` on a whole batch (one batched 3x3
  matrix product in log space);
- skimage_per_image: the same jitter done the common way, ``skimage.color.rgb2hed``,
  scale and shift, ``hed2rgb`` per image (what the batched version replaces);
- macenko / reinhard: a fitted :class:`unshortcut.stain.StainNormalizer` on the batch
  (torchstain, one image at a time: the per-image stain fit is the cost).

Patches are crops of a real H&E image (``../shared/data/bcss``) when it is present,
else smooth random colours. Each rate is the batch size over the median of ``--repeats``
timed calls, after one warm-up call.

Usage: ``python bench/stain.py [--threads 1] [--repeats 5]`` (well under a minute).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from skimage.color import hed2rgb, rgb2hed

from unshortcut.stain import HedJitter, fit_stain_normalizer

IMAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "bcss" / "images" / "1008.jpg"
SHAPES = ((64, 256), (224, 64))  # (patch side, batch size)


def patches(size: int, count: int, seed: int = 0) -> torch.Tensor:
    """(count, 3, size, size) float patches in 0..255 at random places of the H&E image."""
    rng = np.random.default_rng(seed)
    if IMAGE.is_file():
        image = np.asarray(Image.open(IMAGE).convert("RGB"))
    else:
        image = rng.uniform(60, 250, (1024, 1024, 3)).astype(np.uint8)
    ys = rng.integers(0, image.shape[0] - size, count)
    xs = rng.integers(0, image.shape[1] - size, count)
    crops = np.stack([image[y : y + size, x : x + size] for y, x in zip(ys, xs, strict=True)])
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float()


def skimage_per_image(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The per-image scikit-image version of HED jitter (the baseline)."""
    out = torch.empty_like(x)
    for i, image in enumerate(x.permute(0, 2, 3, 1).numpy() / 255):
        scale = 1 + 0.05 * (2 * torch.rand(3, generator=generator).numpy() - 1)
        shift = 0.05 * (2 * torch.rand(3, generator=generator).numpy() - 1)
        rgb = hed2rgb(rgb2hed(image) * scale + shift / np.log(1e6))
        out[i] = torch.from_numpy(rgb * 255).permute(2, 0, 1)
    return out


def rate(call: Callable[[], object], batch: int, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    jitter = HedJitter()
    reference = patches(64, 64, seed=1)
    normalizers = {m: fit_stain_normalizer(m, reference) for m in ("macenko", "reinhard")}
    table = Table(title=f"stain throughput, images/s ({args.threads} thread(s))")
    for column in ("operation", *(f"{size} px (batch {batch})" for size, batch in SHAPES)):
        table.add_column(column, justify="right")
    batches = {shape: patches(*shape) for shape in SHAPES}
    generator = torch.Generator().manual_seed(0)
    operations: dict[str, Callable[[torch.Tensor], object]] = {
        "hed_jitter": lambda x: jitter(x, generator),
        "skimage_per_image": lambda x: skimage_per_image(x, generator),
        **{name: normalizer for name, normalizer in normalizers.items()},
    }
    for name, operation in operations.items():
        cells = []
        for shape in SHAPES:
            x = batches[shape]
            # Per-image operations are timed on a quarter batch: the rate is per image.
            x = x if name == "hed_jitter" else x[: max(1, len(x) // 4)]
            cells.append(f"{rate(lambda x=x, op=operation: op(x), len(x), args.repeats):,.0f}")
        table.add_row(name, *cells)
    Console().print(table)
    if not IMAGE.is_file():
        print(f"({IMAGE} is absent: random colours instead of H&E crops)")


if __name__ == "__main__":
    main()
