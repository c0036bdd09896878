"""Loader: train-only normalisation statistics, sorted reads, aligned augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from unshortcut.data import (
    Augmentation,
    Normalization,
    SplitData,
    augmentation_generator,
    channel_stats,
)
from unshortcut.methods import GroupedSplit
from unshortcut.tiling.patchset import PatchSet, write_patch_set


def write_toy_patch_set(
    path: Path,
    *,
    n: int = 240,
    channels: int = 3,
    size: int = 16,
    seed: int = 0,
    dtype: type = np.uint8,
) -> Path:
    """A learnable patch set: tumor patches carry a bright square in channel 0 (the mask).

    Tissue ratio is high for most tumor patches and low for most non-tumor ones (a
    shortcut), but every group of label x (tissue_ratio >= 0.5) is populated in
    every split. Splits: 60% train, 20% val, 20% test, 4 images each.
    """
    rng = np.random.default_rng(seed)
    label = (np.arange(n) % 2).astype(np.int64)
    rng.shuffle(label)
    split = np.array(["train"] * (n * 6 // 10) + ["val"] * (n // 5) + ["test"] * 0, dtype=object)
    split = np.concatenate([split, np.array(["test"] * (n - len(split)), dtype=object)])
    aligned = rng.random(n) < 0.8
    high = np.where(aligned, label == 1, label == 0)
    tissue = np.where(high, rng.uniform(0.55, 1.0, n), rng.uniform(0.05, 0.45, n))
    pixels = rng.integers(40, 90, size=(n, channels, size, size)).astype(dtype)
    masks = np.zeros((n, size, size), np.uint8)
    for i in np.flatnonzero(label == 1):
        y, x = rng.integers(0, size - size // 2, 2)
        masks[i, y : y + size // 2, x : x + size // 2] = 255
        pixels[i, 0][masks[i] > 0] = 200
    table = pd.DataFrame(
        {
            "patch_id": [f"p{i:05d}" for i in range(n)],
            "image_id": [f"{s}-img{i % 4}" for i, s in enumerate(split)],
            "patient_id": [f"{s}-pat{i % 4}" for i, s in enumerate(split)],
            "split": split.astype(str),
            "x": np.arange(n) * size,
            "y": np.zeros(n, np.int64),
            "size": np.full(n, size),
            "level": np.zeros(n, np.int64),
            "tumor_fraction": masks.reshape(n, -1).mean(axis=1) / 255,
            "tissue_ratio": tissue,
            "label": label,
            "synthetic": np.ones(n, bool),
        }
    )
    write_patch_set(path, table, pixels, masks, {"generator": "tests.write_toy_patch_set"})
    return path


def _split_data(ps: PatchSet, split: str, norm: Normalization) -> SplitData:
    rows = ps.rows(split)
    labels = ps.table["label"].to_numpy()[rows]
    grouped = GroupedSplit.from_attributes(
        labels=labels,
        attributes=(ps.table["tissue_ratio"].to_numpy()[rows] >= 0.5).astype(np.int64),
        image_ids=ps.table["image_id"].to_numpy()[rows],
        n_classes=2,
        n_attributes=2,
    )
    return SplitData(ps.pixels, ps.masks, rows, grouped, norm, torch.device("cpu"))


def test_channel_stats_use_given_rows_only_and_match_numpy() -> None:
    pixels = np.zeros((4, 2, 2, 2), np.uint16)
    pixels[0, 0] = 1000  # row 0 is "train"
    pixels[1, 0] = 3000  # row 1 is "train"
    pixels[2] = 60000  # row 2 is "val": must not move the statistics
    pixels[:2, 1] = [[[1, 2], [3, 4]]]
    stats = channel_stats(pixels, np.array([1, 0]), chunk=1)
    # Channel 0: four 1000s and four 3000s -> mean 2000, std 1000.
    assert stats.mean[0] == pytest.approx(2000.0)
    assert stats.std[0] == pytest.approx(1000.0)
    # Channel 1: 1, 2, 3, 4 twice -> mean 2.5, population std sqrt(1.25).
    assert stats.mean[1] == pytest.approx(2.5)
    assert stats.std[1] == pytest.approx(np.sqrt(1.25))


def test_channel_stats_constant_channel_gets_unit_std() -> None:
    pixels = np.full((3, 1, 4, 4), 7, np.uint8)
    stats = channel_stats(pixels, np.arange(3))
    assert stats.mean == (7.0,) and stats.std == (1.0,)


def test_loader_normalises_with_train_stats_and_keeps_requested_order(tmp_path: Path) -> None:
    ps = PatchSet.open(write_toy_patch_set(tmp_path / "ps"))
    train_rows = ps.rows("train")
    stats = channel_stats(ps.pixels, train_rows, chunk=17)
    reference = ps.pixels[train_rows].astype(np.float64)
    np.testing.assert_allclose(stats.mean, reference.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(stats.std, reference.std(axis=(0, 2, 3)), rtol=1e-9)

    data = _split_data(ps, "val", stats)
    index = np.array([5, 0, 7, 3])
    batch = data.load(index)
    raw = ps.pixels[ps.rows("val")[index]].astype(np.float32)
    expected = (raw - np.array(stats.mean)[None, :, None, None]) / np.array(stats.std)[
        None, :, None, None
    ]
    np.testing.assert_allclose(batch.x.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert batch.index.tolist() == index.tolist()
    assert batch.y.tolist() == ps.table["label"].to_numpy()[ps.rows("val")[index]].tolist()
    assert batch.group.tolist() == (batch.y * 2 + batch.attribute).tolist()
    np.testing.assert_array_equal(
        batch.mask.numpy(), ps.masks[ps.rows("val")[index]].astype(np.float32) / 255
    )


def test_augmentation_keeps_masks_aligned_and_is_seeded() -> None:
    # Channel 0 of each image *is* its mask: any misalignment shows as a difference.
    gen = np.random.default_rng(1)
    mask = torch.from_numpy((gen.random((64, 8, 8)) > 0.5).astype(np.float32))
    x = torch.stack([mask, 1 - mask], dim=1)
    aug = Augmentation(intensity_scale=0.0, intensity_shift=0.0)
    out, out_mask = aug(x, mask, augmentation_generator(0, 0))
    assert out_mask is not None
    torch.testing.assert_close(out[:, 0], out_mask)
    torch.testing.assert_close(out[:, 1], 1 - out_mask)
    # Each output is one of the 8 symmetries of its input, and several occur.
    kinds = set()
    for i in range(len(x)):
        variants = [
            torch.rot90(m, k, (0, 1)) for m in (mask[i], mask[i].flip(-1)) for k in range(4)
        ]
        matches = [k for k, v in enumerate(variants) if torch.equal(v, out_mask[i])]
        assert matches
        kinds.add(matches[0])
    assert len(kinds) >= 6
    again, _ = aug(x, mask, augmentation_generator(0, 0))
    torch.testing.assert_close(again, out)
    other, _ = aug(x, mask, augmentation_generator(0, 1))
    assert not torch.equal(other, out)


def test_intensity_jitter_is_per_channel_affine_within_bounds() -> None:
    x = torch.ones(32, 3, 4, 4)
    aug = Augmentation(flips=False, rotations=False, intensity_scale=0.1, intensity_shift=0.05)
    out, _ = aug(x, None, augmentation_generator(3, 0))
    per_channel = out[:, :, 0, 0]
    assert torch.all(out == per_channel[:, :, None, None])  # one affine map per channel
    assert per_channel.min() >= 1 - 0.1 - 0.05 and per_channel.max() <= 1 + 0.1 + 0.05
    assert per_channel.std() > 0.01


def test_prefetched_batches_equal_plain_batches(tmp_path: Path) -> None:
    ps = PatchSet.open(write_toy_patch_set(tmp_path / "ps"))
    data = _split_data(ps, "train", Normalization.identity(3))
    order = np.random.default_rng(0).permutation(len(data))
    indices = [order[i : i + 32] for i in range(0, len(order), 32)]
    aug = Augmentation()
    plain = list(data.batches(indices, aug, augmentation_generator(0, 2), prefetch=False))
    ahead = list(data.batches(indices, aug, augmentation_generator(0, 2), prefetch=True))
    assert len(plain) == len(ahead) == len(indices)
    for a, b in zip(plain, ahead, strict=True):
        torch.testing.assert_close(a.x, b.x)
        torch.testing.assert_close(a.mask, b.mask)
        assert torch.equal(a.index, b.index)


def test_prefetch_reraises_loader_errors(tmp_path: Path) -> None:
    ps = PatchSet.open(write_toy_patch_set(tmp_path / "ps"))
    data = _split_data(ps, "train", Normalization.identity(3))
    with pytest.raises(IndexError):
        list(data.batches([np.array([0, 1]), np.array([10**6])], prefetch=True))
