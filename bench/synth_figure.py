"""Draw docs/img/synth-example.png: one default synthetic image, its truth and its patches.

Usage: python bench/synth_figure.py [OUT.png] [--seed S]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from unshortcut.synth import RECOMMENDED_PATCHIFY, make_config, synthesize_image

PATCH = RECOMMENDED_PATCHIFY["patch_size"]
INPUT = RECOMMENDED_PATCHIFY["input_size"]


def composite(image: np.ndarray) -> np.ndarray:
    """False colour as usual for multimodal microscopy: CARS red, TPEF green, SHG blue."""
    scaled = image[..., :3].astype(np.float32) / np.iinfo(image.dtype).max
    top = np.percentile(scaled, 99.5, axis=(0, 1))
    return np.clip(scaled / np.maximum(top, 1e-6), 0, 1)


def patch_grid(mask: np.ndarray, reduce: str) -> np.ndarray:
    h, w = (mask.shape[0] // PATCH) * PATCH, (mask.shape[1] // PATCH) * PATCH
    blocks = mask[:h, :w].reshape(h // PATCH, PATCH, w // PATCH, PATCH)
    return blocks.mean(axis=(1, 3)) if reduce == "mean" else blocks.any(axis=(1, 3))


def pick(ratio: np.ndarray, tumor: np.ndarray, want_tumor: bool) -> tuple[int, int]:
    """A tissue-rich, pure tumor or pure normal patch closest to the image centre."""
    pure = tumor > 0.95 if want_tumor else tumor == 0
    rows, cols = np.nonzero(pure & (ratio > 0.95))
    centre = np.array(ratio.shape) / 2
    k = int(np.argmin((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2))
    return int(rows[k]) * PATCH, int(cols[k]) * PATCH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", nargs="?", default="docs/img/synth-example.png", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = make_config(seed=args.seed)
    rendered = next(
        r for r in (synthesize_image(config, i) for i in range(config.images)) if r.plan.has_tumor
    )
    rgb = composite(rendered.image)
    ratio = patch_grid(rendered.tissue, "mean")
    label = patch_grid(rendered.tumor, "any")
    tumor = patch_grid(rendered.tumor, "mean")

    fig, axes = plt.subplots(2, 3, figsize=(13, 9))
    axes[0, 0].imshow(rgb)
    axes[0, 0].set_title(f"{rendered.plan.image_id}: CARS (R), TPEF (G), SHG (B)")
    truth = np.zeros((*rendered.tissue.shape, 3))
    truth[rendered.tissue] = (0.55, 0.55, 0.55)
    truth[rendered.tumor] = (0.85, 0.1, 0.1)
    axes[0, 1].imshow(truth)
    axes[0, 1].set_title("truth: tissue (grey), tumor mask (red)")
    shown = np.ma.masked_where(ratio == 0, ratio)
    im = axes[0, 2].imshow(shown, cmap="viridis", vmin=0, vmax=1)
    axes[0, 2].contour(label, levels=[0.5], colors="red", linewidths=1.0)
    axes[0, 2].set_title(f"tissue ratio per {PATCH} px patch, label-1 outline")
    fig.colorbar(im, ax=axes[0, 2], fraction=0.046)
    for ax, want, name in ((axes[1, 0], True, "tumor"), (axes[1, 1], False, "normal")):
        y, x = pick(ratio, tumor, want)
        y0, x0 = max(0, y - 96), max(0, x - 96)
        ax.imshow(rgb[y0 : y0 + 256, x0 : x0 + 256])
        ax.add_patch(plt.Rectangle((x - x0, y - y0), PATCH, PATCH, fill=False, color="white"))
        ax.set_title(f"{name} tissue, 256 px (box: one {PATCH} px patch)")
    pairs = []
    for want in (True, False):
        y, x = pick(ratio, tumor, want)
        patch = rgb[y : y + PATCH, x : x + PATCH]
        step = PATCH // INPUT
        small = patch.reshape(INPUT, step, INPUT, step, 3).mean(axis=(1, 3))
        pairs.append(np.kron(small, np.ones((step, step, 1))))
    gap = np.ones((PATCH, 4, 3))
    axes[1, 2].imshow(np.concatenate([pairs[0], gap, pairs[1]], axis=1))
    axes[1, 2].set_title(f"model input {INPUT} px: tumor | normal")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
