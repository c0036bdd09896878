"""What tissue looks like in each channel: nuclei, membranes, collagen, noise.

Channels imitate label-free nonlinear microscopy on a dark background:

- CARS (lipids, CH2 stretch): broad signal over all tissue, bright membranes and
  lipid-rich rims around gaps, nuclei darker.
- TPEF (autofluorescence): granular cytoplasm, nuclei appear as dark spots.
- SHG (collagen): thin, oriented fibres in normal stroma, sparse in tumor.

``tumor_signal`` is the only way tumor differs from normal tissue in texture:
more, larger and more irregular nuclei, and fewer collagen fibres. At 0 both look
statistically the same, so only geometry (the shortcut) separates them.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.special import expit

from unshortcut.synth.config import SynthConfig
from unshortcut.synth.geometry import Window, z_quantile
from unshortcut.synth.noise import blurred_white, field_seed, value_noise, white_uniform

BACKGROUND = (0.05, 0.04, 0.025)
"""Dark background level of CARS, TPEF and SHG (fraction of full scale)."""
_SIGMA_PER_DIAMETER = 1.0 / 2.355
"""Gaussian sigma whose half-maximum disc has the given diameter."""


def nucleus_sigmas(config: SynthConfig) -> tuple[float, float]:
    """Blur sigma of (normal, tumor) nuclei; tumor nuclei grow with ``tumor_signal``."""
    normal = config.nucleus_diameter * _SIGMA_PER_DIAMETER
    return normal, normal * (1.0 + 0.3 * config.tumor_signal)


def halo(config: SynthConfig) -> int:
    """Extra pixels a window needs on each side so nucleus blurs match across tiles."""
    return int(np.ceil(4.0 * max(nucleus_sigmas(config)))) + 2


def _ridge(field: np.ndarray, width: float) -> np.ndarray:
    """Thin bright lines along the zero crossings of a noise field (a membrane network)."""
    return np.clip(1.0 - np.abs(field) / np.float32(width), 0.0, 1.0) ** 2


def _nuclei(
    window: Window, config: SynthConfig, ys: np.ndarray, xs: np.ndarray, seed: int
) -> np.ndarray:
    """Soft nucleus map (0..1): Poisson centres blurred into discs and thresholded."""
    signal = config.tumor_signal * window.tumor_weight
    cluster = np.exp(0.35 * value_noise(ys, xs, 40.0, field_seed(seed, "nuclei_cluster")))
    density = (config.nucleus_density / 1000.0) * cluster * (1.0 + 0.5 * signal)
    centres = (white_uniform(ys, xs, field_seed(seed, "nuclei")) < density).astype(np.float32)
    sigma_normal, sigma_tumor = nucleus_sigmas(config)
    peaks = gaussian_filter(centres, sigma_normal) * np.float32(2 * np.pi * sigma_normal**2)
    if sigma_tumor != sigma_normal:
        tumor_peaks = gaussian_filter(centres, sigma_tumor) * np.float32(2 * np.pi * sigma_tumor**2)
        peaks += window.tumor_weight * (tumor_peaks - peaks)
    irregular = 0.15 + 0.25 * signal
    shape = blurred_white(ys, xs, 1.0, field_seed(seed, "nuclei_shape"))
    return np.clip((peaks * (1.0 + irregular * shape) - 0.5) / 0.25 + 0.5, 0.0, 1.0)


def _fibre_family(
    ys: np.ndarray, xs: np.ndarray, angle: float, spacing: float, seed: int
) -> np.ndarray:
    """Wavy, parallel, broken fibres running along ``angle``.

    A cosine across the fibre direction, its phase bent by smooth noise so fibres
    meander and merge, raised to a high power so only thin crests remain.
    """
    across = ys[:, None] * np.cos(angle) - xs[None, :] * np.sin(angle)
    bend = 15.0 * value_noise(ys, xs, 90.0, field_seed(seed, "bend"))
    jitter = 3.0 * value_noise(ys, xs, 18.0, field_seed(seed, "jitter"))
    phase = 2.0 * np.pi * (across + bend) / spacing + jitter
    crests = ((1.0 + np.cos(phase)) / 2.0) ** 12
    breaks = np.clip(value_noise(ys, xs, 20.0, field_seed(seed, "breaks")) + 0.3, 0.0, 1.0)
    return (crests * breaks).astype(np.float32)


def _fibres(
    window: Window, config: SynthConfig, ys: np.ndarray, xs: np.ndarray, seed: int
) -> np.ndarray:
    """SHG collagen: two fibre orientations per image in stroma patches, sparse in tumor."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, np.pi)
    turn = rng.uniform(np.pi / 5, np.pi / 2)
    first = _fibre_family(ys, xs, angle, 11.0, field_seed(seed, "fibre_a"))
    second = _fibre_family(ys, xs, angle + turn, 11.0, field_seed(seed, "fibre_b"))
    mix = expit(3.0 * value_noise(ys, xs, 250.0, field_seed(seed, "fibre_domain")))
    stroma = value_noise(ys, xs, 70.0, field_seed(seed, "stroma"))
    amount = np.clip(2.0 * (stroma - z_quantile(config.fibre_density)) + 0.5, 0.0, 1.0)
    amount *= 1.0 - window.tumor_weight * min(1.0, 0.75 * config.tumor_signal)
    return amount * (mix * first + (1.0 - mix) * second)


def render_texture(
    window: Window, config: SynthConfig, ys: np.ndarray, xs: np.ndarray, seed: int
) -> np.ndarray:
    """Float image (h, w, channels), about 0..1, of one window before site effects."""
    alpha = window.alpha
    nuclei = _nuclei(window, config, ys, xs, seed)
    cells = value_noise(ys, xs, 12.0, field_seed(seed, "cells"))
    grain = blurred_white(ys, xs, 0.8, field_seed(seed, "grain"))
    membranes = _ridge(value_noise(ys, xs, 9.0, field_seed(seed, "membranes")), 0.35)
    illumination = 1.0 + 0.15 * value_noise(ys, xs, 1024.0, field_seed(seed, "illumination"))
    cars = 0.30 + 0.05 * cells + 0.16 * membranes + 0.25 * window.rim
    cars *= 1.0 - 0.4 * nuclei
    tpef = (0.30 + 0.07 * cells + 0.05 * grain) * (1.0 - 0.7 * nuclei)
    shg = 0.02 + 0.55 * _fibres(window, config, ys, xs, seed)
    base = [cars, tpef, shg]
    channels = [
        BACKGROUND[k] * illumination + alpha * illumination * base[k]
        for k in range(min(config.channels, 3))
    ]
    for k in range(3, config.channels):
        weights = np.random.default_rng([seed, k]).dirichlet(np.ones(3))
        channels.append(sum(w * c for w, c in zip(weights, channels[:3], strict=True)))
    image = np.stack(channels, axis=-1).astype(np.float32)
    return _add_noise(image, config.noise, ys, xs, seed)


def _add_noise(
    image: np.ndarray, level: float, ys: np.ndarray, xs: np.ndarray, seed: int
) -> np.ndarray:
    """Detector noise that grows with the signal (shot-like), per channel."""
    for k in range(image.shape[-1]):
        a = white_uniform(ys, xs, field_seed(seed, f"noise{k}a"))
        b = white_uniform(ys, xs, field_seed(seed, f"noise{k}b"))
        gauss = (a + b - 1.0) * np.float32(np.sqrt(6.0))
        image[..., k] += level * (0.5 + 1.5 * np.sqrt(np.maximum(image[..., k], 0))) * gauss
    return image
