"""Paint synthetic textures onto real slide layouts (0 glass, 1 tissue, 2 tumor).

A layout is a small grey PNG where one pixel stands for one tile of a real slide
(for example the CAMELYON17 layouts in the shared data). It is scaled up so its
longest side is the image size; a cubic B-spline over the label indicators rounds
the staircase of the upscaled cells and position-keyed noise roughens the border,
so the result keeps the real arrangement of tissue and tumor without looking blocky.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from unshortcut.errors import UnshortcutError
from unshortcut.synth.noise import bspline_matrix, field_seed, value_noise

LAYOUT_SUFFIXES = (".png",)


def list_layouts(folder: Path) -> list[Path]:
    """The layout PNGs of ``folder`` in name order; raises if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UnshortcutError(f"--layouts {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in LAYOUT_SUFFIXES)
    if not files:
        raise UnshortcutError(f"--layouts {folder}: no .png layout files in it")
    return files


def read_layout(path: Path) -> np.ndarray:
    """Label map (uint8: 0 glass, 1 tissue, 2 tumor) of one layout PNG, validated."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I", "I;16"):
                raise UnshortcutError(f"{path}: layout must be a grey PNG, got mode {image.mode}")
            labels = np.asarray(image)
    except (UnidentifiedImageError, OSError) as error:
        raise UnshortcutError(f"{path}: cannot read layout ({error})") from None
    if labels.ndim != 2 or min(labels.shape) < 2:
        raise UnshortcutError(f"{path}: layout must be a 2-D map of at least 2 x 2 pixels")
    if labels.max() > 2:
        raise UnshortcutError(f"{path}: layout values must be 0 glass, 1 tissue, 2 tumor")
    if not (labels > 0).any():
        raise UnshortcutError(f"{path}: layout holds no tissue")
    return labels.astype(np.uint8)


def layout_patient(path: Path) -> str:
    """Patient of a layout, from a ``patient_<n>`` prefix when the name has one."""
    match = re.match(r"(patient_\d+)", path.stem)
    return match.group(1) if match else path.stem


def layout_shape(labels: np.ndarray, size: int) -> tuple[int, int]:
    """Image shape for a layout scaled so its longest side is ``size``."""
    scale = size / max(labels.shape)
    return (max(1, round(labels.shape[0] * scale)), max(1, round(labels.shape[1] * scale)))


def _smooth_upsample(coords: np.ndarray, cell: float, axis_len: int) -> np.ndarray:
    """B-spline weights from cell centres to pixel ``coords``, clamped at the edges."""
    weights, first = bspline_matrix(coords - 0.5 * cell, cell)
    columns = np.clip(np.arange(first, first + weights.shape[1]), 0, axis_len - 1)
    folded = np.zeros((coords.size, axis_len), dtype=np.float32)
    np.add.at(folded.T, columns, weights.T)
    return folded


@dataclass(frozen=True)
class PaintedGeometry:
    """Tissue and tumor extent from a real layout (one label cell = ``cell`` pixels)."""

    shape: tuple[int, int]
    seed: int
    labels: np.ndarray
    cell: float
    roughness: float

    def _field(
        self, indicator: np.ndarray, ys: np.ndarray, xs: np.ndarray, name: str
    ) -> np.ndarray:
        wy = _smooth_upsample(ys, self.cell, indicator.shape[0])
        wx = _smooth_upsample(xs, self.cell, indicator.shape[1])
        smooth = wy @ indicator.astype(np.float32) @ wx.T
        seed = field_seed(self.seed, name)
        wobble = self.roughness * self.cell * value_noise(ys, xs, 3.0 * self.cell, seed)
        jagged = 4.0 * value_noise(ys, xs, 10.0, seed + 1)
        return (smooth - 0.5) * np.float32(self.cell) + wobble + jagged

    def base(self, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tissue, tumor) signed distances (pixels) around the upscaled layout."""
        tissue = self._field(self.labels >= 1, ys, xs, "layout_tissue")
        tumor = self._field(self.labels == 2, ys, xs, "layout_tumor")
        return tissue, tumor


def painted_geometry(labels: np.ndarray, size: int, seed: int, roughness: float) -> PaintedGeometry:
    """Geometry of ``labels`` scaled to longest side ``size``."""
    return PaintedGeometry(
        shape=layout_shape(labels, size),
        seed=seed,
        labels=labels,
        cell=size / max(labels.shape),
        roughness=roughness,
    )
