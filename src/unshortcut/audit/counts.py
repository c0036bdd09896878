"""Label x attribute-bin counts per split, and which groups are the minority.

The audit, its threshold suggestions and the report all ask the same questions of a
binning: how many patches and how many distinct images does each group hold in each
split, and which groups go against the shortcut. Minority is read from the training
split: a class in a bin that is relatively more typical of the other class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from unshortcut.groups import CLASS_NAMES, GroupScheme

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class GroupCounts:
    """Label x attribute-bin counts of every split; minority groups come from train.

    ``patches[split]`` and ``images[split]`` are (n_classes, n_bins) arrays.
    """

    bin_names: tuple[str, ...]
    patches: dict[str, np.ndarray]
    images: dict[str, np.ndarray]
    class_names: tuple[str, ...] = CLASS_NAMES

    @property
    def minority(self) -> np.ndarray:
        """(n_classes, n_bins): the bin is relatively more typical of another class in train."""
        n = self.patches["train"].astype(float)
        share = n / np.maximum(n.sum(axis=1, keepdims=True), 1)
        return share < share.max(axis=0, keepdims=True)

    def group_name(self, label: int, bin_index: int) -> str:
        return f"{self.class_names[label]}|{self.bin_names[bin_index]}"

    @property
    def minority_groups(self) -> list[str]:
        return [self.group_name(int(y), int(a)) for y, a in np.argwhere(self.minority)]

    @property
    def minority_share(self) -> float:
        """Share of training patches that lie in minority groups."""
        n = self.patches["train"]
        return float(n[self.minority].sum() / max(n.sum(), 1))

    def smallest(self, split: str, minority_only: bool = True) -> tuple[str, int, int] | None:
        """(name, patches, images) of the smallest group of ``split`` (by patches)."""
        if split not in self.patches:
            return None
        n, images = self.patches[split], self.images[split]
        chosen = self.minority if minority_only else np.ones_like(n, dtype=bool)
        if not chosen.any():
            return None
        masked = np.where(chosen, n, np.iinfo(np.int64).max)
        y, a = np.unravel_index(int(np.argmin(masked)), n.shape)
        return self.group_name(int(y), int(a)), int(n[y, a]), int(images[y, a])

    def records(self) -> list[dict[str, Any]]:
        """One row per split and group: counts, shares, minority flag (groups.csv)."""
        rows = []
        for split, n in self.patches.items():
            class_totals = np.maximum(n.sum(axis=1), 1)
            for y, a in np.ndindex(n.shape):
                rows.append(
                    {
                        "split": split,
                        "group": self.group_name(y, a),
                        "class": self.class_names[y],
                        "attribute": self.bin_names[a],
                        "n": int(n[y, a]),
                        "n_images": int(self.images[split][y, a]),
                        "share": float(n[y, a] / max(n.sum(), 1)),
                        "share_within_class": float(n[y, a] / class_totals[y]),
                        "minority": bool(self.minority[y, a]),
                    }
                )
        return rows


def group_counts(scheme: GroupScheme, table: pd.DataFrame, source: str) -> GroupCounts:
    """Patches and distinct images per class and attribute bin, for every split present."""
    patches, images = {}, {}
    shape = (scheme.n_classes, scheme.n_attributes)
    for split in SPLITS:
        part = table[table["split"] == split]
        if not len(part):
            continue
        group = scheme.group_index(part, source)
        patches[split] = np.bincount(group, minlength=scheme.n_groups).reshape(shape)
        _, image = np.unique(part["image_id"].to_numpy(), return_inverse=True)
        pairs = np.unique(group.astype(np.int64) * (image.max() + 1) + image)
        images[split] = np.bincount(pairs // (image.max() + 1), minlength=scheme.n_groups).reshape(
            shape
        )
    return GroupCounts(tuple(scheme.attribute_names), patches, images, tuple(scheme.class_names))


def equal_width_edges(values: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width edges; over [0, 1] for attributes that live there (ratios)."""
    span = (0.0, 1.0) if values.min() >= 0 and values.max() <= 1 else None
    return np.histogram_bin_edges(values, bins=bins, range=span)
