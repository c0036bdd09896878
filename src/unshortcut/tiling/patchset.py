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

Integrity: the manifest records a SHA-256 of each file, computed while writing (for a
``.npy`` store, of its data bytes after the header; for the table, of the file).
Opening checks what is cheap (files present, format version, headers against file
sizes and the manifest, the table's footer); the table's checksum is checked whenever
the table is read (it is read whole anyway), the pixel stores' on demand
(:meth:`PatchSet.verify`, ``unshortcut check``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from unshortcut import __version__
from unshortcut.atomic import atomic_directory, atomic_file, atomic_write_text
from unshortcut.errors import UnshortcutError
from unshortcut.sealed import read_sealed, seal

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
#: Bytes hashed at a time when a file is checked.
_HASH_CHUNK = 16 * 2**20


class NpyAppender:
    """Append rows of a fixed (row_shape, dtype) to a ``.npy`` file of unknown final length."""

    def __init__(self, path: Path, row_shape: Sequence[int], dtype: np.dtype) -> None:
        self.path = Path(path)
        self.row_shape = tuple(int(n) for n in row_shape)
        self.dtype = np.dtype(dtype)
        self.rows = 0
        self._digest = hashlib.sha256()
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
        data = np.ascontiguousarray(rows, dtype=self.dtype).tobytes()
        self._file.write(data)
        self._digest.update(data)
        self.rows += len(rows)

    @property
    def sha256(self) -> str:
        """SHA-256 of the data bytes appended so far (what the manifest records)."""
        return self._digest.hexdigest()

    def close(self) -> None:
        """Write the final row count into the header and flush to disk."""
        if self._file.closed:
            return
        self._file.seek(0)
        self._file.write(self._header(self.rows))
        self._file.close()


def write_table(table: pd.DataFrame, path: Path) -> str:
    """Write the patch table (row order is pixel-store order, so the index is dropped);
    returns the file's SHA-256."""
    table.reset_index(drop=True).to_parquet(path, index=False)
    return file_sha256(path)


def file_sha256(path: Path, skip: int = 0) -> str:
    """SHA-256 of a file's bytes after the first ``skip`` (an ``.npy`` header)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(skip)
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def array_sha256(array: np.ndarray) -> str:
    """SHA-256 of an array's C-order data bytes: what a ``.npy`` store's checksum covers."""
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def write_manifest(manifest: dict[str, Any], path: Path) -> None:
    """manifest.json, sealed with its own content hash (:mod:`unshortcut.sealed`)."""
    text = json.dumps(seal(manifest), indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write_text(path, text)


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
    table: pd.DataFrame,
    channels: int,
    dtype: np.dtype,
    input_size: int,
    checksums: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The manifest fields every patch set carries; writers add how the set was made.

    ``checksums`` maps each file name to its SHA-256 (see the module docstring).
    """
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
        "checksums": {"algorithm": "sha256", **(checksums or {})},
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
    masks = masks.astype(np.uint8, copy=False)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        checksums = {
            TABLE_FILE: write_table(table, tmp / TABLE_FILE),
            PIXELS_FILE: array_sha256(pixels),
            MASKS_FILE: array_sha256(masks),
        }
        np.save(tmp / PIXELS_FILE, np.ascontiguousarray(pixels))
        np.save(tmp / MASKS_FILE, np.ascontiguousarray(masks))
        manifest = base_manifest(table, channels, pixels.dtype, size, checksums)
        manifest["parameters"] = {**parameters, "input_size": size}
        write_manifest(manifest, tmp / MANIFEST_FILE)
    return PatchSet.open(path)


def replace_table(path: Path | str, table: pd.DataFrame) -> PatchSet:
    """Give an existing patch set an edited table (same rows, same order: new splits,
    labels or columns), with the manifest's counts and checksum updated; atomic per file.

    The supported way to edit a table: one written over by hand no longer matches its
    checksum and is refused as damaged.
    """
    path = Path(path)
    patch_set = PatchSet.open(path)
    if len(table) != len(patch_set):
        raise UnshortcutError(
            f"{path / TABLE_FILE}: the new table has {len(table)} rows, the pixel stores "
            f"{len(patch_set)}; rows must stay in pixel-store order"
        )
    manifest = dict(patch_set.manifest)
    with atomic_file(path / TABLE_FILE) as tmp:
        digest = write_table(table, tmp)
        manifest["checksums"] = {**manifest.get("checksums", {}), TABLE_FILE: digest}
        manifest["counts"] = count_table(table)
        # The manifest goes first: a reader between the two renames sees a mismatch
        # (an error), never an old checksum that happens to match.
        write_manifest(manifest, path / MANIFEST_FILE)
    return PatchSet.open(path)


class PatchSet:
    """A validated, lazily read patch set.

    Opening checks that the four files exist, that the manifest names this format and
    version, and that the table and both pixel stores hold the rows, pixel type and
    shape the manifest says; the pixel stores are memory-mapped read-only on first use.
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
        if manifest["n_patches"] != n_rows:
            raise UnshortcutError(
                f"{path / TABLE_FILE}: has {n_rows} rows, {MANIFEST_FILE} says "
                f"{manifest['n_patches']}; the patch set is damaged"
            )
        size = int(manifest["input_size"])
        expected = {
            PIXELS_FILE: ((manifest["channels"], size, size), np.dtype(manifest["dtype"])),
            MASKS_FILE: ((size, size), np.dtype(np.uint8)),
        }
        for name, (row_shape, dtype) in expected.items():
            shape, stored = _npy_header(path / name)
            if shape[0] != n_rows:
                raise UnshortcutError(
                    f"{path / name}: holds {shape[0]} patches but {TABLE_FILE} has {n_rows} rows"
                )
            if tuple(shape[1:]) != tuple(row_shape) or stored.newbyteorder("=") != dtype:
                raise UnshortcutError(
                    f"{path / name}: holds {stored} patches of shape {tuple(shape[1:])}, "
                    f"{MANIFEST_FILE} says {dtype} of {tuple(row_shape)}; the patch set is damaged"
                )
        return cls(path, manifest, n_rows)

    def __len__(self) -> int:
        return self.n_rows

    @cached_property
    def table(self) -> pd.DataFrame:
        """The patch table; its checksum is checked first (it is read whole anyway)."""
        file = self.path / TABLE_FILE
        problem = self._checksum_problem(TABLE_FILE)
        if problem:
            raise UnshortcutError(problem)
        try:
            return pd.read_parquet(file)
        except Exception as error:  # pyarrow reports damage with many exception types
            raise UnshortcutError(f"{file}: unreadable, the file is damaged ({error})") from None

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

    def verify(self) -> list[str]:
        """Every file against its recorded checksum, and float pixels for NaN/inf.

        Reads everything (seconds per GB); returns the problems found, one line each.
        """
        problems = [p for name in (TABLE_FILE, PIXELS_FILE, MASKS_FILE)
                    if (p := self._checksum_problem(name))]  # fmt: skip
        recorded = self.manifest.get("checksums", {})
        if not all(name in recorded for name in (TABLE_FILE, PIXELS_FILE, MASKS_FILE)):
            problems.append(
                f"{self.path / MANIFEST_FILE}: records no checksums (written by an older "
                "unshortcut); only its structure was checked"
            )
        if not problems and self.pixels.dtype.kind == "f":
            bad = _first_non_finite(self.pixels)
            if bad is not None:
                problems.append(
                    f"{self.path / PIXELS_FILE}: patch {bad} holds NaN or infinite values"
                )
        if not problems:
            try:
                self.table  # noqa: B018 - decodes the whole table
            except UnshortcutError as error:
                problems.append(str(error))
        return problems

    def _checksum_problem(self, name: str) -> str | None:
        """A line when ``name`` does not match its recorded checksum (None when it does or
        when none is recorded)."""
        recorded = self.manifest.get("checksums", {}).get(name)
        if recorded is None:
            return None
        file = self.path / name
        skip = 0 if name == TABLE_FILE else _npy_header_length(file)
        if file_sha256(file, skip) != recorded:
            return (
                f"{file}: does not match the checksum in {MANIFEST_FILE}; the file is damaged "
                "(copy it again or run patchify again)"
            )
        return None


def _first_non_finite(pixels: np.ndarray) -> int | None:
    """Index of the first patch holding NaN or inf, streamed in chunks."""
    step = max(1, _HASH_CHUNK // max(1, pixels[0].nbytes))
    for start in range(0, len(pixels), step):
        chunk = np.asarray(pixels[start : start + step])
        finite = np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
        if not finite.all():
            return start + int(np.argmin(finite))
    return None


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest = read_sealed(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise UnshortcutError(f"{path}: not an unshortcut patch set manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise UnshortcutError(
            f"{path}: was written by another version of unshortcut (patch-set format "
            f"version {version}, this one reads {FORMAT_VERSION}); run patchify again"
        )
    try:
        for key in ("n_patches", "channels", "input_size"):
            if not isinstance(manifest[key], int) or manifest[key] < 0:
                raise ValueError(f"{key} is {manifest[key]!r}")
        np.dtype(manifest["dtype"])
        int(manifest["parameters"]["input_size"])
        if not isinstance(manifest.get("checksums", {}), dict):
            raise ValueError("checksums is not a table")
    except (KeyError, TypeError, ValueError) as error:
        raise UnshortcutError(f"{path}: damaged manifest ({error!s})") from None
    return manifest


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the header, checked against the file length (a truncated or
    padded store fails)."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            offset = handle.tell()
        if fortran or dtype.hasobject or not shape:
            raise ValueError(f"a {'Fortran-order' if fortran else 'non-numeric'} array")
    except OSError:
        raise
    except Exception as error:  # numpy reports a damaged header as many exception types
        raise UnshortcutError(f"{path}: not a readable .npy pixel store ({error})") from None
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if path.stat().st_size != expected:
        raise UnshortcutError(
            f"{path}: is {path.stat().st_size} bytes, expected {expected} for shape {shape}"
        )
    return tuple(shape), dtype


def _npy_header_length(path: Path) -> int:
    """Bytes before the data of a ``.npy`` file."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        read(handle)
        return handle.tell()
