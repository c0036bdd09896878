"""A trained model's errors against an attribute, from its saved predictions.

A model that learned the tissue-size shortcut misses tumor patches with little tissue
and flags non-tumor patches with much tissue; plotting the error rate per attribute
bin and class shows it directly. Predictions come from the run folder
(``predictions/<split>.parquet``) joined to the patch set by ``patch_id``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import pandas as pd

from unshortcut.audit.counts import equal_width_edges
from unshortcut.errors import UnshortcutError
from unshortcut.groups import CLASS_NAMES
from unshortcut.report.run_folders import RunFolder

ERROR_BINS = 10
MIN_ERROR_BIN = 5
"""Bins with fewer patches are left out of the rates (their counts stay in the JSON)."""


@dataclass(frozen=True)
class ErrorCurve:
    """A model's errors per attribute bin and class in one split (numeric edges or categories)."""

    bins: tuple[str, ...]
    edges: tuple[float, ...]
    n: np.ndarray
    errors: np.ndarray
    """(n_classes, n_bins) patches and wrong predictions."""

    @property
    def rate(self) -> np.ndarray:
        """Error rate per class and bin; NaN for bins with fewer than MIN_ERROR_BIN patches."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n >= MIN_ERROR_BIN, self.errors / self.n, np.nan)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bins": list(self.bins),
            "edges": list(self.edges),
            "n": self.n.tolist(),
            "errors": self.errors.tolist(),
        }


def error_curve(
    categorical: bool,
    train_values: pd.Series,
    values: pd.Series,
    labels: np.ndarray,
    wrong: np.ndarray,
) -> ErrorCurve:
    """Wrong predictions per class and attribute bin (training-range bins, or categories)."""
    if categorical:
        text = values.astype(str).to_numpy()
        bins: tuple[str, ...] = tuple(sorted(set(text)))
        index = pd.Index(bins).get_indexer(text)
        edges: tuple[float, ...] = ()
    else:
        edge_array = equal_width_edges(train_values.to_numpy(float), ERROR_BINS)
        inner = edge_array[1:-1]
        index = np.searchsorted(inner, values.to_numpy(float), side="right")
        edges = tuple(float(e) for e in edge_array)
        bins = tuple(f"{a:.3g}-{b:.3g}" for a, b in pairwise(edge_array))
    cell = labels.astype(np.int64) * len(bins) + index
    size = len(CLASS_NAMES) * len(bins)
    n = np.bincount(cell, minlength=size).reshape(len(CLASS_NAMES), -1)
    errors = np.bincount(cell, weights=wrong.astype(float), minlength=size).reshape(n.shape)
    return ErrorCurve(bins, edges, n, errors.astype(np.int64))


def predictions_error_curve(
    categorical: bool, column: str, table: pd.DataFrame, predictions: pd.DataFrame, source: str
) -> ErrorCurve:
    """Error curve of a predictions table (contract 3.4 columns) along ``table[column]``.

    Bins come from the training split of ``table``; ``source`` names the predictions
    in the error raised when they hold patches that ``table`` does not.
    """
    values = table.set_index("patch_id")[column].reindex(predictions["patch_id"])
    missing = int(values.isna().sum())
    if missing:
        raise UnshortcutError(
            f"{source}: {missing} of {len(values)} predictions name patches that are not in "
            "the audited patch set (was the run trained on another one?)"
        )
    labels = predictions["label"].to_numpy().astype(np.int64)
    wrong = predictions["prediction"].to_numpy() != labels
    train_values = table.loc[table["split"] == "train", column]
    return error_curve(categorical, train_values, values, labels, wrong)


def run_error_curves(
    categorical: bool, column: str, table: pd.DataFrame, run: RunFolder
) -> dict[str, ErrorCurve]:
    """The run's error curves along ``column`` for the splits it has predictions of."""
    curves = {}
    for split in ("val", "test"):
        predictions = run.predictions(split)
        if predictions is not None:
            source = str(run.path / "predictions" / f"{split}.parquet")
            curves[split] = predictions_error_curve(categorical, column, table, predictions, source)
    return curves
