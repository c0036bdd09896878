"""The reader interface every image format implements.

Tiling talks only to this protocol, so it never knows whether pixels come from a
PNG in memory, a tiled OME-TIFF decoded tile by tile, or an OpenSlide pyramid.
All arrays are channel-last ``(height, width, channels)``, even for one channel.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

import numpy as np


class Closeable:
    """``with reader:`` for every reader: the block's end calls ``close()``."""

    def close(self) -> None:
        """Nothing to release by default."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ImageReader(Protocol):
    """Random access to one image (and its pyramid levels) without loading it whole."""

    path: Path

    @property
    def level_count(self) -> int:
        """Number of resolution levels; level 0 is full resolution."""
        ...

    def level_shape(self, level: int = 0) -> tuple[int, int]:
        """(height, width) of ``level``."""
        ...

    def level_downsample(self, level: int) -> float:
        """Full-resolution pixels per pixel of ``level``."""
        ...

    @property
    def channels(self) -> int:
        """Channel count (1 for grey, 3 for RGB, any number for multiplexed data)."""
        ...

    @property
    def dtype(self) -> np.dtype:
        """Pixel dtype as stored (uint8, uint16, float32, ...)."""
        ...

    def read_region(self, y: int, x: int, height: int, width: int, level: int = 0) -> np.ndarray:
        """Pixels of the rectangle at (row ``y``, column ``x``) in ``level`` coordinates.

        Returns ``(height, width, channels)``; raises UnshortcutError naming the file
        when the rectangle leaves the image or the file cannot be decoded.
        """
        ...

    def close(self) -> None:
        """Release file handles."""
        ...
