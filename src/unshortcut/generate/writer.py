"""Write the augmented patch set: the source set unchanged, then the generated rows.

Real rows keep their order, values and pixels byte for byte (the pixel stores are
copied chunk by chunk, never held whole in memory); generated rows follow, all in
the training split and marked ``synthetic``. The manifest is the source's, with
counts updated and one entry appended to its ``generations`` list saying how the
rows were made. Quality files go into the same folder, inside the same atomic write:
a patch set is either complete with its quality report or absent.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from unshortcut import __version__
from unshortcut.atomic import atomic_directory
from unshortcut.errors import UnshortcutError
from unshortcut.tiling.patchset import (
    MANIFEST_FILE,
    MASKS_FILE,
    PIXELS_FILE,
    TABLE_FILE,
    NpyAppender,
    PatchSet,
    count_table,
    write_manifest,
    write_table,
)

# Patches copied per chunk from the source stores.
COPY_CHUNK = 4096


def write_augmented_patch_set(
    source: PatchSet,
    out: Path,
    rows: pd.DataFrame,
    pixels: np.ndarray,
    masks: np.ndarray,
    generation: dict[str, Any],
    files: Mapping[str, bytes],
    overwrite: bool = False,
) -> PatchSet:
    """``source`` plus ``rows`` (with their ``pixels`` and ``masks``) as a new patch set ``out``."""
    out = Path(out)
    if out.resolve() == source.path.resolve():
        raise UnshortcutError(f"{out}: is the source patch set; write the augmented set elsewhere")
    real = source.table
    if len(rows) != len(pixels) or len(rows) != len(masks):
        raise ValueError(f"{len(rows)} rows, {len(pixels)} pixel and {len(masks)} mask patches")
    if pixels.shape[1:] != source.pixels.shape[1:] or pixels.dtype != source.pixels.dtype:
        raise ValueError(f"generated pixels {pixels.shape[1:]} {pixels.dtype} do not match "
                         f"{source.pixels.shape[1:]} {source.pixels.dtype}")  # fmt: skip
    generated = rows[list(real.columns)].astype(real.dtypes.to_dict())
    table = pd.concat([real, generated], ignore_index=True)
    if table["patch_id"].duplicated().any():
        raise UnshortcutError(f"{out}: generated patch ids clash with the source patch set's")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        # The new files' checksums replace the source's (unshortcut check verifies them).
        checksums = {"algorithm": "sha256", TABLE_FILE: write_table(table, tmp / TABLE_FILE)}
        for name, store, new in ((PIXELS_FILE, source.pixels, pixels),
                                 (MASKS_FILE, source.masks, masks)):  # fmt: skip
            appender = NpyAppender(tmp / name, store.shape[1:], store.dtype)
            try:
                for start in range(0, len(store), COPY_CHUNK):
                    appender.append(np.asarray(store[start : start + COPY_CHUNK]))
                appender.append(new)
            finally:
                appender.close()
            checksums[name] = appender.sha256
        manifest = dict(source.manifest)
        manifest.update(n_patches=len(table), counts=count_table(table), tool_version=__version__,
                        checksums=checksums)  # fmt: skip
        manifest["generations"] = [*source.manifest.get("generations", []), generation]
        write_manifest(manifest, tmp / MANIFEST_FILE)
        for relative, data in files.items():
            target = tmp / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    return PatchSet.open(out)
