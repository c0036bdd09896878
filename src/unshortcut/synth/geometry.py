"""Where tissue, gaps and tumor are: the geometry that plants the tissue shortcut.

Nothing here looks at a patch label. Tissue sections are ellipses with noisy,
lobed borders, loose fragments and tears; normal tissue is lacy (fat-like gaps)
except in dense patches; tumor nodules are solid (few gaps). Cut into patches,
tumor patches therefore tend to be full of tissue while non-tumor patches include
the lacy and border ones, and the exceptions (tumor at a border or gap, dense
normal tissue) appear on their own.

Every field is a pure function of pixel position (see :mod:`.noise`), evaluated on
any window, so images of any size render tile by tile.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
from scipy.ndimage import distance_transform_edt
from scipy.special import expit, ndtri

from unshortcut.synth.config import SynthConfig
from unshortcut.synth.noise import field_seed, fractal_noise, value_noise

_OUTSIDE = np.float32(-1e6)
_PLAN_STEP = 8
"""Grid step (pixels) of the coarse map used to place tumor nodules."""
_GAP_SLOPE = 20.0
"""Pixels per unit of the gap noise near a gap edge (turns noise margins into pixels)."""


def z_quantile(share: float) -> float:
    """Threshold above which a share ``share`` of a unit Gaussian field lies."""
    return float(ndtri(1.0 - min(max(share, 1e-6), 1 - 1e-6)))


@dataclass(frozen=True)
class Ellipses:
    """Filled ellipses; their union's signed distance (pixels, positive inside)."""

    cy: np.ndarray
    cx: np.ndarray
    ry: np.ndarray
    rx: np.ndarray
    angle: np.ndarray

    @classmethod
    def empty(cls) -> Ellipses:
        """No ellipse at all (field is outside everywhere)."""
        none = np.zeros(0)
        return cls(none, none, none, none, none)

    def sdf(self, ys: np.ndarray, xs: np.ndarray, pad: float) -> np.ndarray:
        """Approximate signed distance of the union; exact sign wherever it is above -pad.

        Ellipses farther from the window than ``pad`` beyond their extent are skipped
        (their value there is below -pad), which keeps tile rendering cheap.
        """
        out = np.full((ys.size, xs.size), _OUTSIDE, dtype=np.float32)
        yy = ys.astype(np.float32)[:, None]
        xx = xs.astype(np.float32)[None, :]
        for cy, cx, ry, rx, angle in zip(
            self.cy, self.cx, self.ry, self.rx, self.angle, strict=True
        ):
            dy = max(ys[0] - cy, 0.0, cy - ys[-1])
            dx = max(xs[0] - cx, 0.0, cx - xs[-1])
            scale = float(np.sqrt(ry * rx))
            if np.hypot(dy, dx) > max(ry, rx) * (1.0 + pad / scale):
                continue
            cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
            u = ((xx - cx) * cos + (yy - cy) * sin) / np.float32(rx)
            v = ((yy - cy) * cos - (xx - cx) * sin) / np.float32(ry)
            np.maximum(out, (1.0 - np.sqrt(u * u + v * v)) * np.float32(scale), out=out)
        return out


class BaseGeometry(Protocol):
    """Tissue and tumor extent before gaps: signed distances in pixels."""

    shape: tuple[int, int]
    seed: int

    def base(self, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tissue, tumor) signed distances on the window; positive inside."""
        ...


@dataclass(frozen=True)
class ProceduralGeometry:
    """Randomly drawn sections, fragments and tumor nodules (see :func:`draw_geometry`)."""

    shape: tuple[int, int]
    seed: int
    sections: Ellipses
    fragments: Ellipses
    nodules: Ellipses
    radius: float
    roughness: float
    tumor_size: float

    def tissue_base(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Sections with lobed, jagged borders, united with fragments."""
        lobes = self.roughness * self.radius
        pad = 4.0 * lobes + 64.0
        jagged = 5.0 * value_noise(ys, xs, 12.0, field_seed(self.seed, "jagged"))
        sections = self.sections.sdf(ys, xs, pad)
        sections += lobes * fractal_noise(
            ys, xs, self.radius / 2.0, field_seed(self.seed, "lobes"), octaves=3
        )
        sections += jagged
        fragments = self.fragments.sdf(ys, xs, 64.0) + jagged
        return np.maximum(sections, fragments)

    def base(self, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tissue, tumor) signed distances; tumor borders are rounded but bumpy."""
        tumor = self.nodules.sdf(ys, xs, 4.0 * 0.3 * self.tumor_size + 64.0)
        tumor += (
            0.3
            * self.tumor_size
            * value_noise(ys, xs, self.tumor_size / 2.0, field_seed(self.seed, "tumor_edge"))
        )
        tumor += 3.0 * value_noise(ys, xs, 8.0, field_seed(self.seed, "border"))
        return self.tissue_base(ys, xs), tumor


def _random_ellipses(
    rng: np.random.Generator, centres: np.ndarray, radius: np.ndarray, aspect: tuple[float, float]
) -> Ellipses:
    n = len(centres)
    ratio = rng.uniform(*aspect, size=n)
    return Ellipses(
        cy=centres[:, 0].astype(np.float64),
        cx=centres[:, 1].astype(np.float64),
        ry=radius * np.sqrt(ratio),
        rx=radius / np.sqrt(ratio),
        angle=rng.uniform(0, np.pi, size=n),
    )


def draw_geometry(
    config: SynthConfig, shape: tuple[int, int], seed: int, has_tumor: bool
) -> ProceduralGeometry:
    """Draw sections, fragments and (if ``has_tumor``) nodules for one image.

    Nodules are added until they cover ``tumor_area`` of the tissue on a coarse map.
    A share ``tumor_edge_share`` of them is centred in a band along the tissue
    border, the rest deeper inside; that share sets how often tumor patches hold
    little tissue.
    """
    rng = np.random.default_rng(seed)
    side = float(min(shape))
    radius = config.section_scale * side
    n_sections = int(rng.integers(1, config.max_sections + 1))
    sizes = radius * rng.uniform(0.65, 1.15, size=n_sections) / np.sqrt(n_sections) ** 0.5
    margin = np.minimum(1.8 * sizes, 0.5 * side)
    centres = np.stack(
        [rng.uniform(margin, shape[0] - margin), rng.uniform(margin, shape[1] - margin)], axis=1
    )
    sections = _random_ellipses(rng, centres, sizes, (0.45, 1.0))

    host = rng.integers(0, n_sections, size=config.fragments)
    direction = rng.uniform(0, 2 * np.pi, size=config.fragments)
    reach = sizes[host] * rng.uniform(1.05, 1.5, size=config.fragments)
    frag_centres = centres[host] + reach[:, None] * np.stack(
        [np.sin(direction), np.cos(direction)], axis=1
    )
    frag_sizes = rng.uniform(12.0, 50.0, size=config.fragments) * min(1.0, side / 1024) ** 0.5
    fragments = _random_ellipses(rng, frag_centres, frag_sizes, (0.3, 1.0))

    geometry = ProceduralGeometry(
        shape=shape,
        seed=seed,
        sections=sections,
        fragments=fragments,
        nodules=Ellipses.empty(),
        radius=radius,
        roughness=config.border_roughness,
        tumor_size=config.tumor_size,
    )
    if not has_tumor:
        return geometry
    return replace(geometry, nodules=_place_nodules(config, geometry, rng))


def _place_nodules(
    config: SynthConfig, geometry: ProceduralGeometry, rng: np.random.Generator
) -> Ellipses:
    ys = np.arange(_PLAN_STEP // 2, geometry.shape[0], _PLAN_STEP, dtype=np.float64)
    xs = np.arange(_PLAN_STEP // 2, geometry.shape[1], _PLAN_STEP, dtype=np.float64)
    tissue = geometry.tissue_base(ys, xs) > 0
    if not tissue.any():
        return Ellipses.empty()
    depth = distance_transform_edt(tissue) * _PLAN_STEP
    edge = np.argwhere(tissue & (depth < 0.4 * config.tumor_size))
    inner = np.argwhere(depth >= 0.8 * config.tumor_size)
    if len(inner) == 0:
        inner = np.argwhere(tissue)
    if len(edge) == 0:
        edge = inner
    wobble = (
        0.3
        * config.tumor_size
        * value_noise(ys, xs, config.tumor_size / 2.0, field_seed(geometry.seed, "tumor_edge"))
    )
    covered = np.full(tissue.shape, -np.inf, dtype=np.float32)
    target = config.tumor_area * tissue.sum()
    chosen: list[tuple[float, float, float, float, float]] = []
    for _ in range(200):
        if ((covered + wobble > 0) & tissue).sum() >= target:
            break
        pool = edge if rng.random() < config.tumor_edge_share else inner
        free = pool[covered[pool[:, 0], pool[:, 1]] + wobble[pool[:, 0], pool[:, 1]] <= 0]
        iy, ix = (free if len(free) else pool)[rng.integers(len(free) if len(free) else len(pool))]
        r = config.tumor_size * rng.uniform(0.6, 1.4)
        ratio = rng.uniform(0.55, 1.0)
        nodule = Ellipses(
            np.array([ys[iy]]),
            np.array([xs[ix]]),
            np.array([r * np.sqrt(ratio)]),
            np.array([r / np.sqrt(ratio)]),
            np.array([rng.uniform(0, np.pi)]),
        )
        np.maximum(covered, nodule.sdf(ys, xs, np.inf), out=covered)
        chosen.append((ys[iy], xs[ix], r * np.sqrt(ratio), r / np.sqrt(ratio), nodule.angle[0]))
    cy, cx, ry, rx, angle = (np.array(column) for column in zip(*chosen, strict=True))
    return Ellipses(cy, cx, ry, rx, angle)


@dataclass(frozen=True)
class Window:
    """Geometry of one rectangular window of an image."""

    tissue: np.ndarray
    """bool: ground-truth tissue (inside a section, not in a gap or tear)."""
    tumor: np.ndarray
    """bool: tumor pixels, always a subset of ``tissue``."""
    alpha: np.ndarray
    """float: soft tissue coverage (0..1, anti-aliased edges), > 0.5 exactly on ``tissue``."""
    tumor_weight: np.ndarray
    """float: soft tumor indicator used to blend textures across a tumor border."""
    rim: np.ndarray
    """float: closeness to a gap edge inside tissue (lipid-rich membranes)."""


def carve(geometry: BaseGeometry, config: SynthConfig, ys: np.ndarray, xs: np.ndarray) -> Window:
    """Cut gaps and tears into the base tissue; tumor keeps few gaps, dense normal none."""
    tissue_sdf, tumor_sdf = geometry.base(ys, xs)
    tumor_weight = expit(tumor_sdf / 4.0)
    dense = value_noise(ys, xs, 8.0 * config.hole_scale, field_seed(geometry.seed, "dense"))
    dense_weight = expit(4.0 * (dense - z_quantile(config.dense_normal_share)))
    normal_threshold = dense_weight * z_quantile(0.003) + (1.0 - dense_weight) * z_quantile(
        config.normal_hole_fraction
    )
    threshold = (
        tumor_weight * z_quantile(config.tumor_hole_fraction)
        + (1.0 - tumor_weight) * normal_threshold
    )
    gaps = fractal_noise(ys, xs, config.hole_scale, field_seed(geometry.seed, "gaps"), 2)
    tears = value_noise(ys, xs, 6.0 * config.hole_scale, field_seed(geometry.seed, "tears"))
    gap_margin = _GAP_SLOPE * np.minimum(threshold - gaps, z_quantile(config.tear_fraction) - tears)
    margin = np.minimum(tissue_sdf, gap_margin)
    tissue = margin > 0
    alpha = np.clip(0.5 + margin / 1.5, 0.0, 1.0)
    rim = np.exp(-((gap_margin / 3.0) ** 2)) * tissue
    return Window(
        tissue=tissue,
        tumor=tissue & (tumor_sdf > 0),
        alpha=alpha.astype(np.float32),
        tumor_weight=tumor_weight.astype(np.float32),
        rim=rim.astype(np.float32),
    )
