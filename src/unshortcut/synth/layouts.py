"""Paint synthetic textures onto real slide layouts (0 glass, 1 tissue, 2 tumor).

A layout is a small grey PNG where one pixel stands for one tile of a real slide
(for example the CAMELYON17 layouts in the shared data). It is scaled up so its
longest side is the image size (one label cell becomes a square of pixels); the
borders between labels follow the cells' signed distance, with rounded corners, and
are moved by position-keyed noise of at most 0.4 cell. The result keeps the real
arrangement and the real tumor and tissue shares without looking blocky, and a
layout without tumor paints none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy.ndimage import distance_transform_edt

from unshortcut.errors import UnshortcutError
from unshortcut.synth.noise import field_seed, value_noise

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


_MAX_SHIFT = 0.4
"""Largest border displacement, in layout cells. Below half a cell, so the middle of
every cell keeps its label: no label appears where the layout has none, and even a
one-cell tumor survives (cells of a few pixels or more). Displacements are zero-mean,
so areas are kept on average."""
_WOBBLE_CELLS = 1.5
"""Correlation length of the coarse border noise, in cells: short enough that a
small tumor's area averages over several independent bumps."""
_JAGGED = 4.0
"""Standard deviation (pixels) of the fine border noise, before the bound; its
correlation length is 10 px, or one cell when cells are smaller."""


def _cell_signed_distance(inside: np.ndarray, cell: float) -> np.ndarray:
    """Signed distance (pixels, positive inside) from each cell centre to the region border.

    Half a cell for a cell next to the other label, growing by one cell per cell of
    depth. A layout with no cell (or only cells) of the label gets a value beyond any
    real distance, since the transform needs both labels.
    """
    if not inside.any() or inside.all():
        far = float(sum(inside.shape)) * cell
        return np.full(inside.shape, far if inside.all() else -far, dtype=np.float32)
    cells = np.where(
        inside, distance_transform_edt(inside) - 0.5, 0.5 - distance_transform_edt(~inside)
    )
    return (cells * cell).astype(np.float32)


def _linear_upsample(coords: np.ndarray, cell: float, axis_len: int) -> np.ndarray:
    """Linear interpolation weights from cell centres to pixel centres, clamped at the edges."""
    t = (coords + 0.5) / cell - 0.5
    first = np.floor(t).astype(np.int64)
    frac = (t - first).astype(np.float32)
    weights = np.zeros((coords.size, axis_len), dtype=np.float32)
    rows = np.arange(coords.size)
    np.add.at(weights, (rows, np.clip(first, 0, axis_len - 1)), 1.0 - frac)
    np.add.at(weights, (rows, np.clip(first + 1, 0, axis_len - 1)), frac)
    return weights


@dataclass(frozen=True)
class PaintedGeometry:
    """Tissue and tumor extent from a real layout (one label cell = ``cell`` pixels).

    Each label's field is the signed distance of its cells, interpolated bilinearly
    between cell centres (exact on straight cell borders, rounded at corners, so the
    staircase of the upscaled layout disappears), plus smooth position-keyed noise
    squashed into +-``_MAX_SHIFT`` cells. Bounded, zero-mean noise on a true distance,
    so the painted areas keep the layout's tumor and tissue shares at every size.
    """

    shape: tuple[int, int]
    seed: int
    labels: np.ndarray
    cell: float
    roughness: float

    def _field(self, inside: np.ndarray, ys: np.ndarray, xs: np.ndarray, name: str) -> np.ndarray:
        """Signed distance to the border of ``inside`` (pixels), moved by bounded noise.

        ``tanh`` squashes the noise into +-shift smoothly (no flat clipped runs).
        """
        wy = _linear_upsample(ys, self.cell, inside.shape[0])
        wx = _linear_upsample(xs, self.cell, inside.shape[1])
        distance = wy @ _cell_signed_distance(inside, self.cell) @ wx.T
        shift = np.float32(_MAX_SHIFT * self.cell)
        seed = field_seed(self.seed, name)
        wobble = self.roughness * self.cell * value_noise(ys, xs, _WOBBLE_CELLS * self.cell, seed)
        jagged = _JAGGED * value_noise(ys, xs, min(10.0, self.cell), seed + 1)
        return distance + shift * np.tanh((wobble + jagged) / shift)

    def base(self, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tissue, tumor) signed distances (pixels) around the upscaled layout.

        Tumor is cut to tissue, so tumor never lies on glass even where the two
        borders coincide in the layout but get different noise.
        """
        tissue = self._field(self.labels >= 1, ys, xs, "layout_tissue")
        tumor = self._field(self.labels == 2, ys, xs, "layout_tumor")
        return tissue, np.minimum(tumor, tissue)


def painted_geometry(labels: np.ndarray, size: int, seed: int, roughness: float) -> PaintedGeometry:
    """Geometry of ``labels`` scaled to longest side ``size``."""
    return PaintedGeometry(
        shape=layout_shape(labels, size),
        seed=seed,
        labels=labels,
        cell=size / max(labels.shape),
        roughness=roughness,
    )
