"""How many patches each group needs: explicit counts or a balancing policy.

Groups are the training groups of ``unshortcut train`` (label x attribute bins fitted
on the training split), except that empty groups are kept: a group with no training
rows (a site x label combination never seen) is exactly what a generator can fill.
Counts are taken over every training row, generated ones from an earlier run
included, so topping up an augmented patch set asks only for what is still missing.

Policies (``BalancePolicy.parse``):

- ``largest``: every chosen group grows to the size of the largest training group;
- ``ratio:R`` (0 < R <= 1): every chosen group grows to at least ``ceil(R * largest)``;
- ``count:N``: every chosen group grows to at least ``N`` rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from unshortcut.errors import UnshortcutError
from unshortcut.groups import GroupScheme, fit_groups, parse_attribute_specs


@dataclass(frozen=True)
class BalancePolicy:
    """A rule for how many rows each chosen group should reach."""

    kind: Literal["largest", "ratio", "count"]
    value: float = 0.0

    @classmethod
    def parse(cls, text: str) -> BalancePolicy:
        kind, _, raw = text.strip().partition(":")
        if kind == "largest" and not raw:
            return cls("largest")
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if kind == "ratio" and 0 < value <= 1:
            return cls("ratio", value)
        if kind == "count" and value >= 1 and value == int(value):
            return cls("count", value)
        raise UnshortcutError(
            f"--balance {text!r}: use largest, ratio:R with 0 < R <= 1, or count:N with N >= 1"
        )

    def needed(self, counts: np.ndarray, largest: int) -> np.ndarray:
        """Rows to add to groups of ``counts`` rows when the largest group has ``largest``."""
        if self.kind == "largest":
            target = largest
        elif self.kind == "ratio":
            target = math.ceil(self.value * largest)
        else:
            target = int(self.value)
        return np.maximum(target - np.asarray(counts, dtype=np.int64), 0)


def sampling_scheme(
    train: pd.DataFrame, attributes: Sequence[str], taus: Sequence[float], source: str
) -> GroupScheme:
    """The training groups of ``--attribute``/``--tau``, empty groups kept."""
    specs = parse_attribute_specs(attributes, taus)
    return fit_groups(train, specs, source=source, allow_empty=True)


def chosen_groups(scheme: GroupScheme, names: Sequence[str] | None) -> list[int]:
    """Indices of the named groups (all groups when ``names`` is empty or ``["all"]``)."""
    if not names or list(names) == ["all"]:
        return list(range(scheme.n_groups))
    known = list(scheme.group_names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UnshortcutError(
            f"--groups: unknown group(s) {', '.join(map(repr, unknown))} "
            f"(groups: {', '.join(known)})"
        )
    return sorted({known.index(n) for n in names})


def group_counts(scheme: GroupScheme, train: pd.DataFrame, source: str) -> np.ndarray:
    """Training rows per group (empty groups included)."""
    return np.bincount(scheme.group_index(train, source), minlength=scheme.n_groups)


def plan_counts(
    scheme: GroupScheme,
    train: pd.DataFrame,
    source: str,
    *,
    groups: Sequence[str] | None = None,
    count: int | None = None,
    policy: BalancePolicy | None = None,
) -> dict[str, int]:
    """Patches to generate per group name: ``count`` for each chosen group, or by ``policy``.

    The largest group is the largest over *all* groups, chosen or not, so that
    ``--groups 'tumor|tissue_ratio<0.5' --balance largest`` brings that group level
    with the biggest one. Groups that need nothing are left out.
    """
    if (count is None) == (policy is None):
        raise UnshortcutError("give exactly one of --count and --balance")
    indices = chosen_groups(scheme, groups)
    if count is not None:
        if count < 1:
            raise UnshortcutError(f"--count: must be at least 1, got {count}")
        needed = np.full(len(indices), count)
    else:
        assert policy is not None
        counts = group_counts(scheme, train, source)
        needed = policy.needed(counts[indices], int(counts.max()))
    return {scheme.group_names[g]: int(n) for g, n in zip(indices, needed, strict=True) if n > 0}
