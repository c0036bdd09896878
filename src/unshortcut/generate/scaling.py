"""Pixels to [-1, 1] and back, per channel, from training-split percentiles.

Diffusion works on data in [-1, 1] (the sampler clips its clean-image estimate to
that range), so each channel's ``[low, high]`` (percentiles of the training split,
robust to a few hot pixels) is mapped linearly onto it. The inverse maps back into
the patch set's own dtype: integers are rounded and clipped to the dtype's range,
so for every value inside ``[low, high]`` the round trip is exact. Tumor masks
(uint8, 0..255) use the fixed range [0, 255].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Patches read to estimate the percentiles (a deterministic sample; all when fewer).
PERCENTILE_SAMPLE = 2048


@dataclass(frozen=True)
class PixelScaling:
    """Per-channel linear map ``[low, high] -> [-1, 1]`` and its inverse into ``dtype``."""

    low: tuple[float, ...]
    high: tuple[float, ...]
    dtype: str

    @classmethod
    def fit(
        cls,
        pixels: np.ndarray,
        rows: np.ndarray,
        percentiles: tuple[float, float],
        seed: int,
    ) -> PixelScaling:
        """Percentiles per channel of ``pixels[rows]`` (at most PERCENTILE_SAMPLE patches)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) > PERCENTILE_SAMPLE:
            rng = np.random.default_rng([seed, 0x5CA1E])
            rows = rng.choice(rows, PERCENTILE_SAMPLE, replace=False)
        block = np.asarray(pixels[np.sort(rows)], dtype=np.float64)
        values = block.transpose(1, 0, 2, 3).reshape(block.shape[1], -1)
        low, high = np.percentile(values, percentiles, axis=1)
        high = np.where(high > low, high, low + 1.0)  # a constant channel
        return cls(tuple(low.tolist()), tuple(high.tolist()), str(pixels.dtype))

    def _shape(self, values: tuple[float, ...]) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)[None, :, None, None]

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        """``(N, C, S, S)`` in the store's dtype to float32 in [-1, 1] (clipped)."""
        low, high = self._shape(self.low), self._shape(self.high)
        scaled = (np.asarray(pixels, dtype=np.float64) - low) / (high - low) * 2.0 - 1.0
        return np.clip(scaled, -1.0, 1.0).astype(np.float32)

    def inverse(self, scaled: np.ndarray) -> np.ndarray:
        """Float ``(N, C, S, S)`` in [-1, 1] back to the store's dtype and range."""
        low, high = self._shape(self.low), self._shape(self.high)
        values = low + (np.clip(np.asarray(scaled, np.float64), -1, 1) + 1.0) / 2.0 * (high - low)
        return to_dtype(values, np.dtype(self.dtype))

    def to_dict(self) -> dict[str, Any]:
        return {"low": list(self.low), "high": list(self.high), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PixelScaling:
        return cls(
            tuple(float(v) for v in data["low"]),
            tuple(float(v) for v in data["high"]),
            str(data["dtype"]),
        )


def to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round and clip to an integer dtype's range; plain cast for float dtypes."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def masks_forward(masks: np.ndarray) -> np.ndarray:
    """``(N, S, S)`` uint8 masks to ``(N, 1, S, S)`` float32 in [-1, 1]."""
    return (np.asarray(masks, dtype=np.float32)[:, None] / 127.5 - 1.0).astype(np.float32)


def masks_inverse(scaled: np.ndarray) -> np.ndarray:
    """``(N, 1, S, S)`` float in [-1, 1] back to ``(N, S, S)`` uint8 masks."""
    return to_dtype((np.clip(scaled[:, 0], -1, 1) + 1.0) * 127.5, np.dtype(np.uint8))
