"""Patch-set files: streaming .npy writer, validating reader and its error messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from unshortcut.errors import UnshortcutError
from unshortcut.sealed import seal
from unshortcut.tiling.patchset import (
    FORMAT_NAME,
    FORMAT_VERSION,
    REQUIRED_COLUMNS,
    NpyAppender,
    PatchSet,
    count_table,
    write_patch_set,
)


def test_appender_writes_a_standard_npy(tmp_path: Path) -> None:
    rows = np.arange(5 * 2 * 3 * 3, dtype=np.uint16).reshape(5, 2, 3, 3)
    store = NpyAppender(tmp_path / "a.npy", (2, 3, 3), np.uint16)
    store.append(rows[:2])
    store.append(rows[2:2])
    store.append(rows[2:])
    store.close()
    loaded = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert loaded.shape == (5, 2, 3, 3) and loaded.dtype == np.uint16
    np.testing.assert_array_equal(loaded, rows)
    empty = NpyAppender(tmp_path / "b.npy", (4, 4), np.float32)
    empty.close()
    assert np.load(tmp_path / "b.npy").shape == (0, 4, 4)


def toy_table(n: int = 4) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "patch_id": [f"img@{i * 4},0" for i in range(n)],
            "image_id": "img",
            "patient_id": "img",
            "split": ["train", "train", "val", "test"][:n],
            "x": np.arange(n) * 4,
            "y": 0,
            "size": 4,
            "level": 0,
            "tumor_fraction": np.linspace(0, 1, n),
            "tissue_ratio": 1.0,
            "label": [0, 1, 1, 1][:n],
            "synthetic": False,
            "site": "A",
        }
    )


def make_set(path: Path, n: int = 4) -> PatchSet:
    """A tiny valid patch set."""
    pixels = np.arange(n * 12, dtype=np.uint8).reshape(n, 3, 2, 2)
    masks = np.full((n, 2, 2), 255, np.uint8)
    return write_patch_set(path, toy_table(n), pixels, masks, {"made_by": "test"})


def test_write_patch_set_manifest_and_shape_checks(tmp_path: Path) -> None:
    manifest = make_set(tmp_path / "set").manifest
    assert manifest["format"] == FORMAT_NAME and manifest["format_version"] == FORMAT_VERSION
    assert manifest["parameters"] == {"made_by": "test", "input_size": 2}
    assert (manifest["n_patches"], manifest["channels"], manifest["dtype"]) == (4, 3, "uint8")
    assert manifest["counts"] == count_table(toy_table())
    with pytest.raises(ValueError, match=r"do not match 4 table rows"):
        write_patch_set(
            tmp_path / "bad", toy_table(), np.zeros((3, 3, 2, 2)), np.zeros((3, 2, 2)), {}
        )
    assert not (tmp_path / "bad").exists()
    with pytest.raises(UnshortcutError, match="already exists"):
        make_set(tmp_path / "set")


def test_open_exposes_table_pixels_masks(tmp_path: Path) -> None:
    make_set(tmp_path / "set")
    patches = PatchSet.open(tmp_path / "set")
    assert len(patches) == 4 and patches.channels == 3 and patches.input_size == 2
    assert set(REQUIRED_COLUMNS) <= set(patches.table.columns)
    assert patches.table["site"].tolist() == ["A"] * 4
    assert patches.pixels.shape == (4, 3, 2, 2) and not patches.pixels.flags.writeable
    assert patches.pixels[1, 0].tolist() == [[12, 13], [14, 15]]
    assert patches.masks.shape == (4, 2, 2) and patches.masks.dtype == np.uint8
    assert patches.rows("train").tolist() == [0, 1]
    assert patches.rows("test").dtype == np.int64
    assert patches.manifest["counts"]["train"] == {"patches": 2, "tumor": 1, "non-tumor": 1}
    with pytest.raises(UnshortcutError, match="unknown split"):
        patches.rows("holdout")


@pytest.mark.parametrize("name", ["patches.parquet", "pixels.npy", "masks.npy", "manifest.json"])
def test_missing_file_is_named(tmp_path: Path, name: str) -> None:
    make_set(tmp_path / "set")
    (tmp_path / "set" / name).unlink()
    with pytest.raises(UnshortcutError, match=rf"{name}: missing"):
        PatchSet.open(tmp_path / "set")


def test_other_format_version_is_refused(tmp_path: Path) -> None:
    make_set(tmp_path / "set")
    path = tmp_path / "set" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(seal(manifest)))  # as a newer unshortcut would write it
    with pytest.raises(UnshortcutError, match=r"manifest.json: was written by another version"):
        PatchSet.open(tmp_path / "set")
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(UnshortcutError, match="not an unshortcut patch set"):
        PatchSet.open(tmp_path / "set")
    path.write_text("{not json")
    with pytest.raises(UnshortcutError, match=r"manifest\.json: unreadable"):
        PatchSet.open(tmp_path / "set")


def test_row_count_mismatch_names_the_store(tmp_path: Path) -> None:
    make_set(tmp_path / "set")
    masks = NpyAppender(tmp_path / "set" / "masks.npy", (2, 2), np.uint8)
    masks.append(np.zeros((3, 2, 2), np.uint8))
    masks.close()
    with pytest.raises(UnshortcutError, match=r"masks.npy: holds 3 patches but patches.parquet"):
        PatchSet.open(tmp_path / "set")


def test_truncated_store_is_refused(tmp_path: Path) -> None:
    make_set(tmp_path / "set")
    path = tmp_path / "set" / "pixels.npy"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(UnshortcutError, match=r"pixels.npy: is \d+ bytes, expected"):
        PatchSet.open(tmp_path / "set")


def test_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(UnshortcutError, match="not a patch set folder"):
        PatchSet.open(tmp_path / "nothing")
