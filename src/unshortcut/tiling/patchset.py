"""The patch set on disk (contract 3.2): writer and validating reader.

Layout of a PATCHES folder::

    patches.parquet   one row per patch; row i describes pixel-store index i
    pixels.npy        (N, C, S, S) patch pixels at the model input size, source dtype
    masks.npy         (N, S, S) uint8, round(255 * tumor fraction of each input pixel)
    manifest.json     format name and version, parameters, counts, channels, dtype

The pixel stores are plain ``.npy`` files so any tool can memory-map them
(``np.load(path, mmap_mode="r")``) without this package. They are written by
appending: the header is reserved up front and rewritten with the final row count at
the end, so a writer never holds more than one chunk of patches in memory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from unshortcut import __version__
from unshortcut.atomic import atomic_directory
from unshortcut.errors import UnshortcutError

FORMAT_NAME = "unshortcut-patch-set"
FORMAT_VERSION = 1
TABLE_FILE = "patches.parquet"
PIXELS_FILE = "pixels.npy"
MASKS_FILE = "masks.npy"
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val", "test")
CLASS_NAMES = ("non-tumor", "tumor")
REQUIRED_COLUMNS = (
    "patch_id",
    "image_id",
    "patient_id",
    "split",
    "x",
    "y",
    "size",
    "level",
    "tumor_fraction",
    "tissue_ratio",
    "label",
    "synthetic",
)
# Large enough for any shape this format will hold; the header is padded to this length.
_HEADER_BYTES = 256


class NpyAppender:
    """Append rows of a fixed (row_shape, dtype) to a ``.npy`` file of unknown final length."""

    def __init__(self, path: Path, row_shape: Sequence[int], dtype: np.dtype) -> None:
        self.path = Path(path)
        self.row_shape = tuple(int(n) for n in row_shape)
        self.dtype = np.dtype(dtype)
        self.rows = 0
        self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(self._header(0))

    def _header(self, rows: int) -> bytes:
        """A version-1.0 npy header padded to a fixed length so it can be rewritten in place."""
        descr = np.lib.format.dtype_to_descr(self.dtype)
        text = repr({"descr": descr, "fortran_order": False, "shape": (rows, *self.row_shape)})
        prefix = b"\x93NUMPY\x01\x00"
        body_len = _HEADER_BYTES - len(prefix) - 2
        body = text.encode("latin1").ljust(body_len - 1) + b"\n"
        if len(body) != body_len:
            raise ValueError(f"npy header for shape {self.row_shape} does not fit")
        return prefix + body_len.to_bytes(2, "little") + body

    def append(self, rows: np.ndarray) -> None:
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"rows of shape {rows.shape[1:]} appended to {self.row_shape}")
        self._file.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        """Write the final row count into the header and flush to disk."""
        if self._file.closed:
            return
        self._file.seek(0)
        self._file.write(self._header(self.rows))
        self._file.close()


def write_table(table: pd.DataFrame, path: Path) -> None:
    """Write the patch table; row order is pixel-store order, so the index is dropped."""
    table.reset_index(drop=True).to_parquet(path, index=False)


def write_manifest(manifest: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def count_table(table: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Patches per split and class, as stored in the manifest and printed by the CLI."""
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        rows = table[table["split"] == split]
        counts[split] = {
            "patches": len(rows),
            "tumor": int((rows["label"] == 1).sum()),
            "non-tumor": int((rows["label"] == 0).sum()),
        }
    return counts


def base_manifest(
    table: pd.DataFrame, channels: int, dtype: np.dtype, input_size: int
) -> dict[str, Any]:
    """The manifest fields every patch set carries; writers add how the set was made."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tool": "unshortcut",
        "tool_version": __version__,
        "n_patches": len(table),
        "channels": int(channels),
        "dtype": str(np.dtype(dtype)),
        "input_size": int(input_size),
        "class_names": list(CLASS_NAMES),
        "splits": list(SPLITS),
        "counts": count_table(table),
        "files": {"table": TABLE_FILE, "pixels": PIXELS_FILE, "masks": MASKS_FILE},
    }


def write_patch_set(
    path: Path,
    table: pd.DataFrame,
    pixels: np.ndarray,
    masks: np.ndarray,
    parameters: dict[str, Any],
    overwrite: bool = False,
) -> PatchSet:
    """Write a complete patch set from in-memory arrays, atomically, and open it.

    For patch sets that do not come from ``patchify`` (generated patches, test and
    benchmark fixtures): ``pixels`` is (N, C, S, S), ``masks`` (N, S, S) uint8, and
    ``table`` has one row per patch in the same order. ``parameters`` records how the
    set was made; ``input_size`` is filled in from the pixels.
    """
    n, channels, size = len(table), pixels.shape[1], pixels.shape[-1]
    if pixels.shape != (n, channels, size, size) or masks.shape != (n, size, size):
        raise ValueError(
            f"pixels {pixels.shape} and masks {masks.shape} do not match {n} table rows"
        )
    with atomic_directory(path, overwrite=overwrite) as tmp:
        write_table(table, tmp / TABLE_FILE)
        np.save(tmp / PIXELS_FILE, pixels)
        np.save(tmp / MASKS_FILE, masks.astype(np.uint8, copy=False))
        manifest = base_manifest(table, channels, pixels.dtype, size)
        manifest["parameters"] = {**parameters, "input_size": size}
        write_manifest(manifest, tmp / MANIFEST_FILE)
    return PatchSet.open(path)


class PatchSet:
    """A validated, lazily read patch set.

    Opening checks that the four files exist, that the manifest names this format and
    version, and that the table and both pixel stores hold the same number of rows; the
    pixel stores are memory-mapped read-only on first use.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], n_rows: int) -> None:
        self.path = path
        self.manifest = manifest
        self.n_rows = n_rows

    @classmethod
    def open(cls, path: Path | str) -> PatchSet:
        path = Path(path)
        if not path.is_dir():
            raise UnshortcutError(f"{path}: not a patch set folder (run `unshortcut patchify`)")
        for name in (MANIFEST_FILE, TABLE_FILE, PIXELS_FILE, MASKS_FILE):
            if not (path / name).is_file():
                raise UnshortcutError(f"{path / name}: missing; the patch set is incomplete")
        manifest = _read_manifest(path / MANIFEST_FILE)
        try:
            n_rows = pq.read_metadata(path / TABLE_FILE).num_rows
            columns = set(pq.read_schema(path / TABLE_FILE).names)
        except Exception as error:
            raise UnshortcutError(f"{path / TABLE_FILE}: unreadable ({error})") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise UnshortcutError(f"{path / TABLE_FILE}: missing columns {', '.join(missing)}")
        for name in (PIXELS_FILE, MASKS_FILE):
            shape = _npy_shape(path / name)
            if shape[0] != n_rows:
                raise UnshortcutError(
                    f"{path / name}: holds {shape[0]} patches but {TABLE_FILE} has {n_rows} rows"
                )
        return cls(path, manifest, n_rows)

    def __len__(self) -> int:
        return self.n_rows

    @cached_property
    def table(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / TABLE_FILE)

    @cached_property
    def pixels(self) -> np.ndarray:
        """(N, C, S, S) read-only memory map in the source dtype."""
        return np.load(self.path / PIXELS_FILE, mmap_mode="r")

    @cached_property
    def masks(self) -> np.ndarray:
        """(N, S, S) uint8 read-only memory map: round(255 * tumor fraction)."""
        return np.load(self.path / MASKS_FILE, mmap_mode="r")

    @property
    def channels(self) -> int:
        return int(self.manifest["channels"])

    @property
    def input_size(self) -> int:
        return int(self.manifest["parameters"]["input_size"])

    def rows(self, split: str) -> np.ndarray:
        """Pixel-store positions (int64) of the patches in ``split``."""
        if split not in SPLITS:
            raise UnshortcutError(f"split: unknown split {split!r} (use {', '.join(SPLITS)})")
        return np.flatnonzero(self.table["split"].to_numpy() == split).astype(np.int64)


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UnshortcutError(f"{path}: unreadable ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise UnshortcutError(f"{path}: not an unshortcut patch set manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise UnshortcutError(
            f"{path}: was written by another version of unshortcut (patch-set format "
            f"version {version}, this one reads {FORMAT_VERSION}); run patchify again"
        )
    return manifest


def _npy_shape(path: Path) -> tuple[int, ...]:
    """Shape from the header, checked against the file length (a truncated store fails)."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
            offset = handle.tell()
    except (OSError, ValueError) as error:
        raise UnshortcutError(f"{path}: not a readable .npy pixel store ({error})") from None
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if path.stat().st_size != expected:
        raise UnshortcutError(
            f"{path}: is {path.stat().st_size} bytes, expected {expected} for shape {shape}"
        )
    return tuple(shape)
