"""Patient-safe splits: no unit in two splits, non-empty splits, region units, warnings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from unshortcut.errors import UnshortcutError
from unshortcut.tiling.splits import (
    allocate,
    draw_splits,
    parse_fractions,
    split_warnings,
    unit_keys,
)


def test_parse_fractions() -> None:
    assert parse_fractions("0.6,0.2,0.2") == (0.6, 0.2, 0.2)
    assert parse_fractions("0.8,0.2,0") == (0.8, 0.2, 0.0)
    for bad in ("0.5,0.5", "0.6,0.2,0.3", "a,b,c", "0,0.5,0.5", "1.2,-0.1,-0.1"):
        with pytest.raises(UnshortcutError, match="--split-fractions"):
            parse_fractions(bad)


def test_allocate_largest_remainder() -> None:
    rng = np.random.default_rng(0)
    assert allocate(10, (0.6, 0.2, 0.2), rng).tolist() == [6, 2, 2]
    assert allocate(5, (0.6, 0.2, 0.2), rng).tolist() == [3, 1, 1]
    assert allocate(7, (0.6, 0.2, 0.2), rng).sum() == 7


@pytest.mark.parametrize("seed", range(20))
def test_no_patient_in_two_splits_and_every_split_filled(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_patients = int(rng.integers(3, 30))
    patients = rng.integers(0, n_patients, 2000).astype(str)
    patients[:n_patients] = np.arange(n_patients).astype(str)  # every patient present
    labels = rng.integers(0, 2, 2000)
    splits = draw_splits(patients, labels, (0.6, 0.2, 0.2), seed)
    per_patient = pd.DataFrame({"p": patients, "s": splits}).groupby("p")["s"].nunique()
    assert per_patient.max() == 1
    assert set(splits) == {"train", "val", "test"}


def test_splits_follow_fractions_and_seed() -> None:
    units = np.repeat(np.arange(100).astype(str), 3)
    labels = np.tile([0, 0, 1], 100)
    splits = draw_splits(units, labels, (0.6, 0.2, 0.2), seed=3)
    per_unit = pd.Series(splits[::3]).value_counts()
    assert per_unit.to_dict() == {"train": 60, "val": 20, "test": 20}
    np.testing.assert_array_equal(splits, draw_splits(units, labels, (0.6, 0.2, 0.2), seed=3))
    assert not np.array_equal(splits, draw_splits(units, labels, (0.6, 0.2, 0.2), seed=4))


def test_stratified_by_tumor_units() -> None:
    # 5 tumor units and 5 non-tumor units: each split gets both kinds.
    units = np.arange(10).astype(str)
    labels = np.array([1] * 5 + [0] * 5)
    splits = draw_splits(units, labels, (0.6, 0.2, 0.2), seed=0)
    for split in ("train", "val", "test"):
        assert set(labels[splits == split]) == {0, 1}


def test_region_units_by_patch_centre() -> None:
    table = pd.DataFrame(
        {"image_id": ["a", "a", "a", "b"], "x": [0, 32, 96, 0], "y": [0, 0, 64, 0], "size": 32}
    )
    keys = unit_keys(table, "region", 64)
    # Centres (16,16), (48,16), (112,80) and image b: blocks 0,0 / 0,0 / 1,1 / b's 0,0.
    assert keys.tolist() == ["a#0,0", "a#0,0", "a#1,1", "b#0,0"]
    with pytest.raises(UnshortcutError, match="--region-size"):
        unit_keys(table, "region", 0)


def test_region_split_keeps_blocks_whole() -> None:
    ys, xs = np.meshgrid(np.arange(0, 1024, 32), np.arange(0, 1024, 32), indexing="ij")
    table = pd.DataFrame({"image_id": "slide", "x": xs.ravel(), "y": ys.ravel(), "size": 32})
    units = unit_keys(table, "region", 256)
    labels = (table["x"].to_numpy() < 300).astype(int)
    splits = draw_splits(units, labels, (0.6, 0.2, 0.2), seed=1)
    assert pd.DataFrame({"u": units, "s": splits}).groupby("u")["s"].nunique().max() == 1
    assert set(splits) == {"train", "val", "test"}


def test_warnings_name_empty_splits_missing_classes_and_shared_patients() -> None:
    table = pd.DataFrame(
        {
            "split": ["train", "train", "val", "val"],
            "label": [0, 1, 0, 0],
            "patient_id": ["p1", "p2", "p2", "p3"],
        }
    )
    problems = split_warnings(table)
    assert problems == [
        "split 'val' has no tumor patches",
        "split 'test' is empty",
        "patient 'p2' appears in more than one split",
    ]
    assert split_warnings(table, (0.8, 0.2, 0.0), check_patients=False) == [
        "split 'val' has no tumor patches"
    ]
