"""Class-conditional group sampling shared by class-balanced ERM, resampling and GERNE.

A batch holds ``per_class`` rows of every class; within a class the rows are spread
over attribute bins by a target ``p(a|y)`` and drawn uniformly (with replacement)
inside each group. Fractional counts ``per_class * p(a|y)`` are rounded by
systematic sampling: one uniform offset per class, so each group gets the floor or the
ceiling of its expected count, the class total is exact, and the expected count is
exactly ``per_class * p(a|y)`` at every step.
"""

from __future__ import annotations

import numpy as np

from unshortcut.rows import GroupedSplit


def systematic_counts(rng: np.random.Generator, total: int, probs: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total`` with expectation ``total * probs``."""
    probs = np.asarray(probs, dtype=float)
    edges = np.concatenate([[0.0], np.cumsum(total * probs / probs.sum())])
    edges[-1] = float(total)
    return np.diff(np.floor(edges + rng.uniform())).astype(np.int64)


def rows_by_group(split: GroupedSplit) -> list[np.ndarray]:
    """Row indices of each group (index = group id)."""
    groups = split.groups
    order = np.argsort(groups, kind="stable")
    bounds = np.searchsorted(groups[order], np.arange(split.n_groups + 1))
    return [order[bounds[g] : bounds[g + 1]] for g in range(split.n_groups)]


def draw_class_conditional(
    rng: np.random.Generator,
    members: list[np.ndarray],
    n_attributes: int,
    per_class: int,
    p_attribute_given_class: np.ndarray,
) -> np.ndarray:
    """Row indices of one batch: ``per_class`` rows per class spread by ``p(a|y)``.

    Groups with no rows must have zero probability (callers validate this).
    """
    n_classes = p_attribute_given_class.shape[0]
    chosen: list[np.ndarray] = []
    for y in range(n_classes):
        counts = systematic_counts(rng, per_class, p_attribute_given_class[y])
        for a, count in enumerate(counts):
            if count:
                rows = members[y * n_attributes + a]
                chosen.append(rows[rng.integers(len(rows), size=count)])
    return np.concatenate(chosen)


def draw_group_uniform(
    rng: np.random.Generator, members: list[np.ndarray], total: int
) -> np.ndarray:
    """Row indices of one batch of ``total`` rows spread evenly over the non-empty groups.

    Group counts use systematic rounding, so every non-empty group expects exactly
    ``total / n_present`` rows per batch; rows are drawn uniformly (with replacement)
    inside each group. Empty groups cannot be sampled and are skipped.
    """
    present = np.array([len(rows) > 0 for rows in members])
    counts = systematic_counts(rng, total, present / present.sum())
    chosen = [
        rows[rng.integers(len(rows), size=n)] for rows, n in zip(members, counts, strict=True) if n
    ]
    return np.concatenate(chosen)
