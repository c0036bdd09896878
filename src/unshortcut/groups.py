"""Groups: the class label crossed with binned nuisance attributes.

A shortcut is an attribute (above all the tissue ratio of a patch) whose bins are
distributed differently in the two classes. Every debiasing method and every
worst-group metric needs the same discrete view of it, so this module owns it:

- :class:`AttributeSpec` says how to bin one column (thresholds, training-split
  quantiles, or categories); :func:`parse_attribute_specs` reads the CLI syntax.
- :func:`fit_groups` fits the bins on the *training split only* (quantile edges and
  category lists must not peek at validation or test data) and refuses binnings that
  leave a group of the training split empty, because then no method can balance it.
- :class:`GroupScheme` is the fitted result. It maps any table to attribute and
  group indices, with ``group = label * n_attributes + attribute`` (the contract of
  ``unshortcut.methods.base.GroupedSplit``), and names every group so that a person
  can read a table: ``tumor|tissue_ratio>=0.5``, ``non-tumor|tissue_ratio<0.5&site=B``.
  It round-trips through JSON so that a run folder evaluates new data with exactly
  the bins it was trained with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import pairwise, product
from typing import Any

import numpy as np
import pandas as pd

from unshortcut.errors import UnshortcutError
from unshortcut.rows import GroupedSplit, intersection_index

CLASS_NAMES: tuple[str, ...] = ("non-tumor", "tumor")
DEFAULT_ATTRIBUTE = "tissue_ratio"
DEFAULT_TAU = 0.5
DEFAULT_QUANTILES = 2
"""Bins of a numeric attribute outside [0, 1] given no thresholds: split at the median."""


@dataclass(frozen=True)
class AttributeSpec:
    """How to bin one column, before seeing data.

    Exactly one way applies:

    - ``thresholds``: bins ``v < t0``, ``t0 <= v < t1``, ..., ``v >= t_last``;
    - ``quantiles=q``: the same with the training split's ``q``-quantiles as thresholds;
    - ``categorical=True``: one bin per value seen in the training split;
    - none of them: the single threshold :data:`DEFAULT_TAU` for a share in [0, 1]
      (tissue ratio), the training split's median for any other number (an age), which
      has no natural threshold: continuous attributes need no hand-picked tau.

    ``categorical=None`` is what a bare CLI name (``--attribute site``) gives: the
    column decides at fit time, categorical when it is not numeric (text, boolean),
    else the thresholds (the ``--tau`` values, or the default).
    """

    column: str
    thresholds: tuple[float, ...] = ()
    quantiles: int = 0
    categorical: bool | None = False

    def __post_init__(self) -> None:
        if self.quantiles and (self.thresholds or self.categorical is not False):
            raise ValueError(f"{self.column}: quantiles exclude thresholds and categorical")
        if self.categorical and self.thresholds:
            raise ValueError(f"{self.column}: a categorical attribute takes no thresholds")
        if self.quantiles == 1 or self.quantiles < 0:
            raise ValueError(f"{self.column}: quantiles must be 0 (off) or at least 2")
        if list(self.thresholds) != sorted(set(self.thresholds)):
            raise ValueError(f"{self.column}: thresholds must be distinct and increasing")


NO_ATTRIBUTE = "none"
"""``--attribute none``: no nuisance attribute, one bin per class."""

NO_ATTRIBUTE_BIN = "all"
"""Name of the single attribute bin when there is no attribute (groups ``tumor|all``)."""


def parse_attribute_specs(attributes: Sequence[str], taus: Sequence[float]) -> list[AttributeSpec]:
    """Read ``--attribute`` values; ``--tau`` values apply to every bare name.

    Syntax: ``tissue_ratio`` (thresholds from ``--tau``, default 0.5; categorical when
    the column turns out non-numeric), ``tissue_ratio:0.3,0.6`` (inline thresholds),
    ``tissue_ratio:q4`` (training-split quartiles), ``site:cat`` (categorical).
    No attribute means ``tissue_ratio``. Several attributes give intersectional groups.
    ``none`` alone gives groups that are the classes (data with no nuisance attribute,
    such as a control set without glass).
    """
    taus_t = _checked_thresholds(taus, "--tau")
    if list(attributes) == [NO_ATTRIBUTE]:
        if taus_t:
            raise UnshortcutError("--tau: --attribute none has no thresholds")
        return []
    specs = [_parse_one(text, taus_t) for text in (attributes or [DEFAULT_ATTRIBUTE])]
    columns = [spec.column for spec in specs]
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise UnshortcutError(f"--attribute: {', '.join(repeated)} given more than once")
    if taus_t and all(spec.categorical is not None for spec in specs):
        raise UnshortcutError(
            "--tau: applies to bare attribute names only, and every --attribute sets its "
            "own bins (drop --tau or write e.g. tissue_ratio:0.3)"
        )
    return specs


def _parse_one(text: str, taus: tuple[float, ...]) -> AttributeSpec:
    column, colon, how = text.strip().rpartition(":")
    if not how:
        raise UnshortcutError(f"--attribute {text!r}: give a column name, e.g. tissue_ratio")
    if not colon:
        return AttributeSpec(how, thresholds=taus, categorical=None)
    if not column:
        raise UnshortcutError(f"--attribute {text!r}: the column name is missing")
    if how == "cat":
        return AttributeSpec(column, categorical=True)
    if how.startswith("q"):
        q = how[1:]
        if not q.isdigit() or int(q) < 2:
            raise UnshortcutError(f"--attribute {text!r}: quantile bins read like q4 (q >= 2)")
        return AttributeSpec(column, quantiles=int(q))
    try:
        values = [float(v) for v in how.split(",")]
    except ValueError:
        raise UnshortcutError(
            f"--attribute {text!r}: after ':' give thresholds (0.3,0.6), quantiles (q4) or cat"
        ) from None
    return AttributeSpec(column, thresholds=_checked_thresholds(values, f"--attribute {text!r}"))


def _checked_thresholds(values: Sequence[float], option: str) -> tuple[float, ...]:
    if any(not math.isfinite(v) for v in values):
        raise UnshortcutError(f"{option}: thresholds must be finite numbers")
    if len(set(values)) != len(values):
        raise UnshortcutError(f"{option}: thresholds must be distinct")
    return tuple(sorted(float(v) for v in values))


@dataclass(frozen=True)
class BinnedAttribute:
    """One fitted attribute: numeric ``edges`` or the training split's ``categories``.

    Numeric bin ``k`` holds ``edges[k-1] <= v < edges[k]`` (the first and last bins are
    open-ended), so a value equal to a threshold goes to the upper bin, as ``>=`` says.
    """

    column: str
    edges: tuple[float, ...] = ()
    categories: tuple[str, ...] = ()

    @property
    def n_bins(self) -> int:
        return len(self.categories) if self.categories else len(self.edges) + 1

    @property
    def bin_names(self) -> list[str]:
        if self.categories:
            return [f"{self.column}={c}" for c in self.categories]
        e = _format_numbers(self.edges)
        c = self.column
        inner = [f"{lo}<={c}<{hi}" for lo, hi in pairwise(e)]
        return [f"{c}<{e[0]}", *inner, f"{c}>={e[-1]}"]

    def bin_index(self, table: pd.DataFrame, source: str) -> np.ndarray:
        """Bin of every row; values outside the fitted categories are refused."""
        values = _column(table, self.column, source)
        if self.categories:
            return category_index(
                values, self.categories, self.column, source, "not seen in the training split"
            )
        if not _is_numeric(values):
            raise UnshortcutError(f"{source}: column '{self.column}' is not numeric")
        return np.searchsorted(np.asarray(self.edges), values.to_numpy(float), side="right")

    def to_dict(self) -> dict[str, Any]:
        if self.categories:
            return {"column": self.column, "categories": list(self.categories)}
        return {"column": self.column, "edges": list(self.edges)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BinnedAttribute:
        return cls(
            column=str(data["column"]),
            edges=tuple(float(e) for e in data.get("edges", ())),
            categories=tuple(str(c) for c in data.get("categories", ())),
        )


def _format_numbers(values: Sequence[float]) -> list[str]:
    """Short decimal names (4 significant digits) that still tell every value apart."""
    for digits in range(4, 18):
        names = [f"{v:.{digits}g}" for v in values]
        if len(set(names)) == len(names):
            return names
    return [repr(v) for v in values]


def category_index(
    values: pd.Series, categories: Sequence[str], column: str, source: str, unseen_means: str
) -> np.ndarray:
    """Index of each value (as text) in ``categories``; a value outside them is refused,
    the message saying what that means (``unseen_means``: where they were fitted)."""
    text = values.astype(str).to_numpy()
    index = pd.Index(categories).get_indexer(text)
    if (index < 0).any():
        unseen = ", ".join(sorted(set(text[index < 0]))[:5])
        raise UnshortcutError(
            f"{source}: column '{column}' has value(s) {unseen} {unseen_means} "
            f"(known: {', '.join(categories)})"
        )
    return index.astype(np.int64)


def _column(table: pd.DataFrame, column: str, source: str) -> pd.Series:
    if column not in table.columns:
        available = ", ".join(map(str, table.columns))
        raise UnshortcutError(f"{source}: no column '{column}' (available: {available})")
    values = table[column]
    missing = int(values.isna().sum())
    if missing:
        raise UnshortcutError(f"{source}: column '{column}' has {missing} missing value(s)")
    return values


def _is_numeric(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


@dataclass(frozen=True)
class GroupScheme:
    """Fitted groups: ``group = label * n_attributes + attribute``.

    The attribute index of an intersection is mixed-radix with the first attribute
    most significant, so attribute names are the product of the bin names in order.
    """

    attributes: tuple[BinnedAttribute, ...]
    label_column: str = "label"
    class_names: tuple[str, ...] = CLASS_NAMES

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_attributes(self) -> int:
        return math.prod(a.n_bins for a in self.attributes)

    @property
    def n_groups(self) -> int:
        return self.n_classes * self.n_attributes

    @cached_property
    def attribute_names(self) -> tuple[str, ...]:
        if not self.attributes:
            return (NO_ATTRIBUTE_BIN,)
        return tuple("&".join(parts) for parts in product(*(a.bin_names for a in self.attributes)))

    @cached_property
    def group_names(self) -> tuple[str, ...]:
        return tuple(f"{c}|{a}" for c in self.class_names for a in self.attribute_names)

    @property
    def bin_counts(self) -> tuple[int, ...]:
        return tuple(a.n_bins for a in self.attributes)

    def bin_matrix(self, table: pd.DataFrame, source: str = "table") -> np.ndarray:
        """``(n, d)`` bin of every attribute (int64) of every row of ``table``."""
        columns = [a.bin_index(table, source) for a in self.attributes]
        return np.stack(columns, axis=1) if columns else np.zeros((len(table), 0), np.int64)

    def value_matrix(self, table: pd.DataFrame, source: str = "table") -> np.ndarray:
        """``(n, d)`` raw value of every attribute (category index when categorical)."""
        columns = [
            a.bin_index(table, source).astype(np.float64)
            if a.categories
            else _column(table, a.column, source).to_numpy(np.float64)
            for a in self.attributes
        ]
        return np.stack(columns, axis=1) if columns else np.zeros((len(table), 0))

    def attribute_index(self, table: pd.DataFrame, source: str = "table") -> np.ndarray:
        """Intersectional attribute bin (int64) of every row of ``table``."""
        return intersection_index(self.bin_matrix(table, source), self.bin_counts)

    def grouped_split(self, table: pd.DataFrame, source: str = "table") -> GroupedSplit:
        """What training needs of ``table``'s rows: labels, bins, raw values, image ids."""
        return GroupedSplit(
            labels=self.labels(table, source),
            bins=self.bin_matrix(table, source),
            bin_counts=self.bin_counts,
            image_ids=table["image_id"].to_numpy(),
            n_classes=self.n_classes,
            values=self.value_matrix(table, source),
            attribute_names=tuple(a.column for a in self.attributes),
            continuous=tuple(not a.categories for a in self.attributes),
        )

    def labels(self, table: pd.DataFrame, source: str = "table") -> np.ndarray:
        """Class label (int64) of every row, checked to lie in ``0..n_classes-1``."""
        values = _column(table, self.label_column, source).to_numpy()
        if not np.isin(values, np.arange(self.n_classes)).all():
            raise UnshortcutError(
                f"{source}: column '{self.label_column}' must hold 0 (non-tumor) or 1 (tumor)"
            )
        return values.astype(np.int64)

    def group_index(self, table: pd.DataFrame, source: str = "table") -> np.ndarray:
        """Group (int64) of every row of ``table``."""
        return self.labels(table, source) * self.n_attributes + self.attribute_index(table, source)

    def counts(self, table: pd.DataFrame, source: str = "table") -> pd.DataFrame:
        """One row per group (empty ones included): n, share of all rows, share within class."""
        n = np.bincount(self.group_index(table, source), minlength=self.n_groups)
        per_class = n.reshape(self.n_classes, self.n_attributes)
        class_totals = np.repeat(per_class.sum(axis=1), self.n_attributes)
        return pd.DataFrame(
            {
                "group": self.group_names,
                "class": np.repeat(self.class_names, self.n_attributes),
                "attribute": self.attribute_names * self.n_classes,
                "n": n,
                "share": n / max(len(table), 1),
                "share_within_class": np.divide(
                    n, class_totals, out=np.zeros(len(n)), where=class_totals > 0
                ),
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; the names are included for readers and ignored by ``from_dict``."""
        return {
            "label_column": self.label_column,
            "class_names": list(self.class_names),
            "attributes": [a.to_dict() for a in self.attributes],
            "attribute_names": list(self.attribute_names),
            "group_names": list(self.group_names),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroupScheme:
        return cls(
            attributes=tuple(BinnedAttribute.from_dict(a) for a in data["attributes"]),
            label_column=str(data.get("label_column", "label")),
            class_names=tuple(data.get("class_names", CLASS_NAMES)),
        )


def fit_groups(
    train_table: pd.DataFrame,
    specs: Sequence[AttributeSpec],
    *,
    label_column: str = "label",
    source: str = "patch set",
    allow_empty: bool = False,
) -> GroupScheme:
    """Fit bins on the training rows and check that every group has training rows.

    ``train_table`` must hold the training split only: quantile edges and category
    lists come from it. ``source`` names the data in error messages. ``allow_empty``
    accepts groups without training rows (a generator fills exactly those); both
    classes must still be present.
    """
    scheme = GroupScheme(
        attributes=tuple(_fit_attribute(train_table, spec, source) for spec in specs),
        label_column=label_column,
    )
    labels = scheme.labels(train_table, source)
    for label, name in enumerate(scheme.class_names):
        if not (labels == label).any():
            raise UnshortcutError(
                f"{source}: the training split has no {name} rows "
                f"({label_column} = {label}); both classes are needed"
            )
    if allow_empty:
        return scheme
    n = np.bincount(scheme.group_index(train_table, source), minlength=scheme.n_groups)
    empty = [name for name, count in zip(scheme.group_names, n, strict=True) if count == 0]
    if empty:
        raise UnshortcutError(
            f"{source}: empty training groups: {', '.join(empty)} "
            "(choose other thresholds or fewer bins)"
        )
    return scheme


def _fit_attribute(table: pd.DataFrame, spec: AttributeSpec, source: str) -> BinnedAttribute:
    values = _column(table, spec.column, source)
    numeric = _is_numeric(values)
    if spec.categorical or (spec.categorical is None and not numeric):
        return BinnedAttribute(spec.column, categories=tuple(sorted(set(values.astype(str)))))
    if not numeric:
        raise UnshortcutError(
            f"{source}: column '{spec.column}' is not numeric, so thresholds and quantiles "
            f"do not apply (use --attribute {spec.column}:cat)"
        )
    array = values.to_numpy(float)
    lo, hi = float(array.min()), float(array.max())
    if spec.quantiles:
        text = f"{spec.column}:q{spec.quantiles}"
        return _quantile_bins(spec.column, array, spec.quantiles, text, source)
    if not spec.thresholds and not (lo >= 0.0 and hi <= 1.0):
        # DEFAULT_TAU is a threshold for shares in [0, 1]; other numbers (an age) have none.
        return _quantile_bins(spec.column, array, DEFAULT_QUANTILES, spec.column, source)
    thresholds = spec.thresholds or (DEFAULT_TAU,)
    for tau in thresholds:
        if not lo <= tau <= hi:
            if spec.categorical is None:
                what = f"--tau {tau:g}" if spec.thresholds else f"the default --tau {tau:g}"
            else:
                what = f"threshold {tau:g} of --attribute {spec.column}"
            raise UnshortcutError(
                f"{source}: {what} is outside {spec.column}'s range {_format_range(lo, hi)} "
                "in the training split"
            )
    return BinnedAttribute(spec.column, edges=thresholds)


def _quantile_bins(
    column: str, array: np.ndarray, quantiles: int, spec_text: str, source: str
) -> BinnedAttribute:
    """Bins at the training split's ``quantiles``-quantiles (ties merged)."""
    edges = np.unique(np.quantile(array, np.arange(1, quantiles) / quantiles))
    edges = edges[edges > array.min()]  # an edge at the minimum would leave its lower bin empty
    if edges.size == 0:
        raise UnshortcutError(
            f"{source}: '{spec_text}' gives a single bin "
            f"({column} has too few distinct values in the training split)"
        )
    return BinnedAttribute(column, edges=tuple(float(e) for e in edges))


def _format_range(lo: float, hi: float) -> str:
    """Two decimals as in ``[0.05, 1.00]``, more digits when two decimals hide the width."""
    if hi - lo < 0.05:
        return f"[{lo:.4g}, {hi:.4g}]"
    return f"[{lo:.2f}, {hi:.2f}]"
