"""Shortcut audit: how well does a nuisance attribute alone predict the label?

Before training anything, a user should know whether the patch labels carry a
shortcut. For each attribute the audit reports, per split, the AUROC of the
attribute used as a score for the label (0.5 = no shortcut; for categorical
attributes the score is the training-split tumor rate of the category), the group
table (label x attribute bins) with counts and within-class shares, and a plot of the
attribute's distribution per class. Everything is computed from patches.parquet, so
the numbers can be recomputed by anyone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from unshortcut.atomic import atomic_directory
from unshortcut.groups import AttributeSpec, GroupScheme, fit_groups
from unshortcut.tiling.patchset import PatchSet

SPLITS = ("train", "val", "test")


@dataclass
class AuditResult:
    """Attribute-only AUROC per split, and the group table of every split."""

    scheme: GroupScheme
    attribute_auroc: dict[str, dict[str, float | None]]
    group_table: pd.DataFrame

    def to_dict(self) -> dict[str, object]:
        return {
            "attribute_auroc": self.attribute_auroc,
            "groups": self.group_table.to_dict(orient="records"),
            "scheme": self.scheme.to_dict(),
        }


def _attribute_score(spec: AttributeSpec, train: pd.DataFrame, table: pd.DataFrame) -> np.ndarray:
    """A score from the attribute alone: its value, or its category's training tumor rate."""
    values = table[spec.column]
    if pd.api.types.is_numeric_dtype(values) and not spec.categorical:
        return values.to_numpy(dtype=float)
    rates = train.groupby(spec.column)["label"].mean()
    return values.map(rates).fillna(0.5).to_numpy(dtype=float)


def _auroc(labels: np.ndarray, score: np.ndarray) -> float | None:
    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, score))


def audit_patch_set(patches: PatchSet, specs: list[AttributeSpec]) -> AuditResult:
    """Attribute-only AUROC and group tables; the group bins are fitted on train only."""
    table = patches.table
    train = table[table["split"] == "train"]
    scheme = fit_groups(train, specs, source=str(patches.path))
    aurocs: dict[str, dict[str, float | None]] = {}
    for spec in specs:
        aurocs[spec.column] = {}
        for split in SPLITS:
            part = table[table["split"] == split]
            if len(part):
                score = _attribute_score(spec, train, part)
                aurocs[spec.column][split] = _auroc(part["label"].to_numpy(), score)
    frames = []
    for split in SPLITS:
        part = table[table["split"] == split]
        if len(part):
            frames.append(scheme.counts(part).assign(split=split))
    return AuditResult(scheme, aurocs, pd.concat(frames, ignore_index=True))


def plot_attribute_distributions(table: pd.DataFrame, columns: list[str], path: Path) -> None:
    """Histogram of each numeric attribute per class (training split)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [c for c in columns if pd.api.types.is_numeric_dtype(table[c])]
    if not numeric:
        return
    train = table[table["split"] == "train"]
    fig, axes = plt.subplots(1, len(numeric), figsize=(4.5 * len(numeric), 3.2), squeeze=False)
    for ax, column in zip(axes[0], numeric, strict=True):
        for label, name, colour in ((0, "non-tumor", "#4c72b0"), (1, "tumor", "#dd8452")):
            values = train.loc[train["label"] == label, column]
            ax.hist(
                values,
                bins=20,
                range=(0, 1) if column.endswith("ratio") else None,
                alpha=0.6,
                density=True,
                label=f"{name} (n={len(values)})",
                color=colour,
            )
        ax.set_xlabel(column)
        ax.set_ylabel("density (train)")
        ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_audit(result: AuditResult, patches: PatchSet, out: Path, overwrite: bool) -> None:
    """audit.json, groups.csv and attribute_distribution.png, written atomically."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / "audit.json").write_text(json.dumps(result.to_dict(), indent=2))
        result.group_table.to_csv(tmp / "groups.csv", index=False)
        columns = list(result.attribute_auroc)
        plot_attribute_distributions(patches.table, columns, tmp / "attribute_distribution.png")
