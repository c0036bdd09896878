"""Every number the audit has about one attribute.

For one column: the AUROC of the attribute alone for the label in every split, with
a 95% image-level bootstrap interval (a categorical attribute scores each patch with
its category's training tumor rate), the mutual information with the label in bits
(on the bins, and for numeric attributes a k-nearest-neighbour estimate on the raw
values), the label x bin counts, the training distribution per class (for the plot),
and threshold candidates. Bins are fitted on the training split as ``train`` fits
them; a binning that train would refuse becomes a note, not an error, so the audit
still says what it can.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.feature_selection import mutual_info_classif
from sklearn.metrics import mutual_info_score

from unshortcut.audit.counts import SPLITS, GroupCounts, equal_width_edges, group_counts
from unshortcut.audit.model_errors import ErrorCurve
from unshortcut.audit.thresholds import TauCandidate, suggest, tau_candidates
from unshortcut.audit.verdict import Verdict
from unshortcut.errors import UnshortcutError
from unshortcut.groups import (
    CLASS_NAMES,
    DEFAULT_ATTRIBUTE,
    AttributeSpec,
    fit_groups,
    parse_attribute_specs,
)
from unshortcut.metrics import image_bootstrap_auroc
from unshortcut.tiling.patchset import REQUIRED_COLUMNS

CATEGORICAL_MAX_VALUES = 10
"""A numeric metadata column with at most this many values is audited as categories."""
DISTRIBUTION_BINS = 20
BITS = math.log(2)


@dataclass
class AttributeAudit:
    """Every number the audit has about one attribute."""

    column: str
    kind: str
    """numeric, categorical or constant (one value in the training split)."""
    auroc: dict[str, tuple[float | None, list[float] | None]] = field(default_factory=dict)
    mutual_information_bits: float | None = None
    mutual_information_knn_bits: float | None = None
    label_entropy_bits: float = 0.0
    counts: GroupCounts | None = None
    edges: tuple[float, ...] = ()
    distribution: dict[str, Any] = field(default_factory=dict)
    taus: list[TauCandidate] = field(default_factory=list)
    errors: dict[str, ErrorCurve] = field(default_factory=dict)
    note: str | None = None
    verdict: Verdict | None = None

    @property
    def train_auroc(self) -> float | None:
        return self.auroc.get("train", (None, None))[0]

    @property
    def strength(self) -> float:
        """|AUROC - 0.5| on train: how far the attribute alone is from guessing."""
        value = self.train_auroc
        return 0.0 if value is None else abs(value - 0.5)

    @property
    def suggested_taus(self) -> list[TauCandidate]:
        """Measurable thresholds, most exposing first (at most three)."""
        return suggest(self.taus)

    def to_dict(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "kind": self.kind,
            "auroc": {s: {"value": v, "ci": ci} for s, (v, ci) in self.auroc.items()},
            "mutual_information_bits": self.mutual_information_bits,
            "mutual_information_knn_bits": self.mutual_information_knn_bits,
            "label_entropy_bits": self.label_entropy_bits,
            "bins": None if self.counts is None else list(self.counts.bin_names),
            "edges": list(self.edges),
            "minority_groups": None if self.counts is None else self.counts.minority_groups,
            "minority_share": None if self.counts is None else self.counts.minority_share,
            "groups": None if self.counts is None else self.counts.records(),
            "distribution": self.distribution,
            "tau_candidates": [t.to_dict() for t in self.taus],
            "suggested_taus": [t.tau for t in self.suggested_taus],
            "errors": {split: curve.to_dict() for split, curve in self.errors.items()},
            "note": self.note,
            "verdict": None if self.verdict is None else self.verdict.to_dict(),
        }


def default_audit_specs(table: pd.DataFrame, taus: Sequence[float] = ()) -> list[AttributeSpec]:
    """tissue_ratio (binned at ``taus``, default 0.5) and every metadata column.

    Metadata columns are those a patch set carries beyond the required ones. Text and
    boolean columns, and numeric ones with few values, are categorical; other numeric
    columns are cut at their training quartiles.
    """
    specs = parse_attribute_specs([DEFAULT_ATTRIBUTE], taus)
    train = table[table["split"] == "train"]
    for column in table.columns:
        if column in REQUIRED_COLUMNS:
            continue
        values = train[column]
        if _is_numeric(values) and values.nunique() > CATEGORICAL_MAX_VALUES:
            specs.append(AttributeSpec(column, quantiles=4))
        else:
            specs.append(AttributeSpec(column, categorical=True))
    return specs


def _is_numeric(values: pd.Series) -> bool:
    """Numbers that thresholds apply to (booleans are categories), as groups.py decides."""
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


def _is_categorical(spec: AttributeSpec, values: pd.Series) -> bool:
    return bool(spec.categorical) or (spec.categorical is None and not _is_numeric(values))


def _attribute_score(
    categorical: bool, train: pd.DataFrame, part: pd.DataFrame, column: str
) -> np.ndarray:
    """A score from the attribute alone: its value, or its category's training tumor rate."""
    if not categorical:
        return part[column].to_numpy(dtype=float)
    rates = train.groupby(train[column].astype(str))["label"].mean()
    return part[column].astype(str).map(rates).fillna(0.5).to_numpy(dtype=float)


def _entropy_bits(labels: np.ndarray) -> float:
    p = np.bincount(labels) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def _distribution(
    categorical: bool, train: pd.DataFrame, column: str, labels: np.ndarray
) -> dict[str, Any]:
    """Training counts per class: a histogram (numeric) or per category (for the plot)."""
    values = train[column]
    if categorical:
        text = values.astype(str).to_numpy()
        categories = sorted(set(text))
        counts = {
            name: [int(((text == c) & (labels == y)).sum()) for c in categories]
            for y, name in enumerate(CLASS_NAMES)
        }
        return {"categories": categories, "counts": counts}
    array = values.to_numpy(float)
    edges = equal_width_edges(array, DISTRIBUTION_BINS)
    counts = {
        name: np.histogram(array[labels == y], bins=edges)[0].tolist()
        for y, name in enumerate(CLASS_NAMES)
    }
    return {"edges": edges.tolist(), "counts": counts}


def audit_attribute(
    spec: AttributeSpec,
    table: pd.DataFrame,
    source: str,
    *,
    n_bootstrap: int,
    seed: int,
    min_patches: int,
    min_images: int,
) -> AttributeAudit:
    """Every number about one attribute; a binning that train would refuse becomes a note."""
    column = spec.column
    train = table[table["split"] == "train"]
    labels = train["label"].to_numpy().astype(np.int64)
    categorical = _is_categorical(spec, train[column])
    entropy = _entropy_bits(labels)
    if train[column].astype(str).nunique() < 2:
        value = train[column].iloc[0]
        return AttributeAudit(
            column,
            "constant",
            label_entropy_bits=entropy,
            note=f"{column} is {value} on every training patch",
        )
    audit = AttributeAudit(
        column, "categorical" if categorical else "numeric", label_entropy_bits=entropy
    )
    for split in SPLITS:
        part = table[table["split"] == split]
        if len(part):
            score = _attribute_score(categorical, train, part, column)
            audit.auroc[split] = image_bootstrap_auroc(
                part["label"].to_numpy(),
                score,
                part["image_id"].to_numpy(),
                n_bootstrap=n_bootstrap,
                seed=seed,
            )
    audit.distribution = _distribution(categorical, train, column, labels)
    if not categorical:
        values = train[column].to_numpy(float).reshape(-1, 1)
        knn = mutual_info_classif(values, labels, discrete_features=False, random_state=seed)
        audit.mutual_information_knn_bits = float(knn[0]) / BITS
        audit.taus = tau_candidates(
            train, table[table["split"] == "val"], column, spec.thresholds, min_patches, min_images
        )
    try:
        scheme = fit_groups(train, [spec], source=source)
    except UnshortcutError as error:
        audit.note = f"no groups: {error}"
        return audit
    audit.counts = group_counts(scheme, table, source)
    audit.edges = scheme.attributes[0].edges
    bins = scheme.attribute_index(train, source)
    audit.mutual_information_bits = float(mutual_info_score(labels, bins)) / BITS
    return audit
