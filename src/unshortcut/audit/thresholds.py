"""Threshold (tau) suggestions for a numeric attribute.

A threshold is only useful if the groups it makes can be measured: every group needs
enough patches from enough images in train (to learn from) and in validation (where
checkpoints are chosen by worst-group accuracy). Among those, the thresholds that
separate the classes most expose the shortcut best. The test split is never read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from unshortcut.audit.counts import group_counts
from unshortcut.groups import BinnedAttribute, GroupScheme

MIN_GROUP_PATCHES = 30
"""A group with fewer patches gives an unreliable accuracy (as in unshortcut.metrics)."""
MIN_GROUP_IMAGES = 3
"""A group from fewer images cannot carry an image-level interval."""
TAU_QUANTILES = tuple(round(q, 2) for q in np.arange(0.05, 0.96, 0.05))
SUGGESTIONS = 3
SPACING = 0.1


@dataclass(frozen=True)
class TauCandidate:
    """One threshold for a numeric attribute: how it splits the classes and its smallest groups."""

    tau: float
    gap: float
    """|p(value >= tau | tumor) - p(value >= tau | non-tumor)| in train: how much it exposes."""
    smallest: dict[str, tuple[str, int, int]]
    """Per split (train, val): the smallest group (name, patches, images)."""
    measurable: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "tau": self.tau,
            "gap": self.gap,
            "measurable": self.measurable,
            "smallest_group": {
                split: {"group": g, "n": n, "n_images": i}
                for split, (g, n, i) in self.smallest.items()
            },
        }


def tau_candidates(
    train: pd.DataFrame,
    val: pd.DataFrame,
    column: str,
    extra: Sequence[float] = (),
    min_patches: int = MIN_GROUP_PATCHES,
    min_images: int = MIN_GROUP_IMAGES,
) -> list[TauCandidate]:
    """Thresholds at training quantiles (two decimals) plus ``extra``, in increasing order.

    A threshold is *measurable* when every group of label x (value >= tau) holds at
    least ``min_patches`` patches from ``min_images`` images in train and in
    validation (validation is where checkpoints are chosen by worst-group accuracy).
    """
    values = train[column].to_numpy(float)
    lo, hi = values.min(), values.max()
    quantiles = np.round(np.quantile(values, TAU_QUANTILES), 2)
    taus = sorted({float(t) for t in (*quantiles, *extra) if lo < t <= hi})
    labels = train["label"].to_numpy()
    result = []
    for tau in taus:
        above = values >= tau
        gap = abs(above[labels == 1].mean() - above[labels == 0].mean())
        scheme = GroupScheme((BinnedAttribute(column, edges=(tau,)),))
        counts = group_counts(scheme, pd.concat([train, val]), "patch set")
        smallest = {
            s: counts.smallest(s, minority_only=False)
            for s in ("train", "val")
            if s in counts.patches
        }
        measurable = "val" in smallest and all(
            g is not None and g[1] >= min_patches and g[2] >= min_images for g in smallest.values()
        )
        result.append(TauCandidate(tau, float(gap), smallest, measurable))  # type: ignore[arg-type]
    return result


def rank_measurable(candidates: Sequence[TauCandidate]) -> list[TauCandidate]:
    """The measurable thresholds, largest class gap first (ties: the lower tau)."""
    return sorted((t for t in candidates if t.measurable), key=lambda t: (-t.gap, t.tau))


def suggest(candidates: Sequence[TauCandidate]) -> list[TauCandidate]:
    """Measurable thresholds, most exposing first, at most SUGGESTIONS.

    Neighbours of a better suggestion (closer than SPACING of the candidates' span)
    are skipped: three nearly equal thresholds would offer no choice.
    """
    ranked = rank_measurable(candidates)
    span = max((t.tau for t in candidates), default=0) - min((t.tau for t in candidates), default=0)
    chosen: list[TauCandidate] = []
    for candidate in ranked:
        if all(abs(candidate.tau - c.tau) >= SPACING * span for c in chosen):
            chosen.append(candidate)
    return chosen[:SUGGESTIONS]
