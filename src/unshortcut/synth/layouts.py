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
"""Largest border displacement, in layout cells. Below half a cell, so the centre of
every cell keeps its label: no label can appear where the layout has none, and even a
one-cell tumor survives."""
_REACH = 16.0
"""Pixels beyond the largest shift up to which signed distances are exact; farther
away they are clipped, which keeps the per-window distance transform small while
soft blends over a few pixels (tumor texture weight) still saturate."""
_JAGGED = 4.0
"""Standard deviation (pixels) of the fine border noise, before the bound."""


@dataclass(frozen=True)
class PaintedGeometry:
    """Tissue and tumor extent from a real layout (one label cell = ``cell`` pixels).

    Each label region is the nearest-neighbour upscaled layout, whose border is moved
    by smooth position-keyed noise squashed into +-``_MAX_SHIFT`` cells. A perturbed
    signed distance, not a smoothed indicator plus unbounded noise, so the painted
    areas keep the layout's tumor and tissue shares at every size.
    """

    shape: tuple[int, int]
    seed: int
    labels: np.ndarray
    cell: float
    roughness: float

    def _cells(self, coords: np.ndarray, axis: int) -> np.ndarray:
        """Layout row (axis 0) or column (axis 1) under each pixel centre, clamped."""
        index = np.floor((coords + 0.5) / self.cell).astype(np.int64)
        return np.clip(index, 0, self.labels.shape[axis] - 1)

    def _signed_distance(
        self, inside: np.ndarray, ys: np.ndarray, xs: np.ndarray, reach: float
    ) -> np.ndarray:
        """Pixel distance to the upscaled border of ``inside`` (positive inside), clipped.

        Exact within ``reach``: the transform runs on the window grown by ``reach``,
        which holds every border point that close, so any tiling gives the same values.
        """
        pad = int(np.ceil(reach)) + 1
        iy = np.rint(ys).astype(np.int64)
        ix = np.rint(xs).astype(np.int64)
        gy = np.arange(iy.min() - pad, iy.max() + pad + 1)
        gx = np.arange(ix.min() - pad, ix.max() + pad + 1)
        cells = inside[np.ix_(self._cells(gy, 0), self._cells(gx, 1))]
        if cells.all() or not cells.any():
            value = reach if cells.flat[0] else -reach
            return np.full((ys.size, xs.size), value, dtype=np.float32)
        distance = np.where(
            cells,
            distance_transform_edt(cells) - 0.5,
            0.5 - distance_transform_edt(~cells),
        )
        rows, columns = np.ix_(iy - gy[0], ix - gx[0])
        return np.clip(distance[rows, columns], -reach, reach).astype(np.float32)

    def _field(self, inside: np.ndarray, ys: np.ndarray, xs: np.ndarray, name: str) -> np.ndarray:
        shift = np.float32(_MAX_SHIFT * self.cell)
        seed = field_seed(self.seed, name)
        wobble = self.roughness * self.cell * value_noise(ys, xs, _CORR * self.cell, seed)
        jagged = _JAGGED * value_noise(ys, xs, 10.0, seed + 1)
        displacement = shift * np.tanh((wobble + jagged) / shift)
        return self._signed_distance(inside, ys, xs, shift + _REACH) + displacement

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
