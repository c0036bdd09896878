"""What training knows of a split's rows: labels, attribute bins, raw attribute values.

These two types sit below the data loader and the methods (both import them; neither
imports the other), so a method sees the data only through arrays, never through a
patch set or a loader.

Attributes are kept per attribute, as WILDS' ``CombinatorialGrouper`` keeps its
factors: ``bins`` is an ``(n, d)`` matrix with one column per attribute (``d = 0``
without attributes), ``values`` the raw values behind it (continuous ones too; the
category index for categorical ones). The intersectional bin that group-robust methods
balance, ``attributes``, is derived from ``bins`` (mixed radix, first attribute most
significant: the order of :class:`unshortcut.groups.GroupScheme`'s names), and
``group = label * n_attributes + attribute``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from functools import cached_property

import numpy as np
import torch


def intersection_index(bins: np.ndarray, bin_counts: tuple[int, ...]) -> np.ndarray:
    """Mixed-radix index of each row's bins, shape ``(n,)`` (0 for every row when d = 0)."""
    index = np.zeros(len(bins), dtype=np.int64)
    for column, count in enumerate(bin_counts):
        index = index * count + bins[:, column]
    return index


@dataclass(frozen=True)
class GroupedSplit:
    """Labels, per-attribute bins and raw values of one split; row i is ``Batch.index`` i."""

    labels: np.ndarray
    bins: np.ndarray
    """``(n, d)`` int64: the bin of each attribute."""
    bin_counts: tuple[int, ...]
    """Bins per attribute, ``(d,)``."""
    image_ids: np.ndarray
    n_classes: int = 2
    values: np.ndarray | None = None
    """``(n, d)`` float64 raw attribute values (category index for categorical attributes)."""
    attribute_names: tuple[str, ...] = ()
    """Column name of each attribute."""
    continuous: tuple[bool, ...] = field(default=())
    """Per attribute: numeric (regression target) rather than categorical."""

    def __post_init__(self) -> None:
        if self.bins.ndim != 2 or self.bins.shape != (len(self.labels), len(self.bin_counts)):
            raise ValueError(
                f"bins must be (n, d) = ({len(self.labels)}, {len(self.bin_counts)}), "
                f"got {self.bins.shape}"
            )
        if self.values is not None and self.values.shape != self.bins.shape:
            raise ValueError(f"values {self.values.shape} do not match bins {self.bins.shape}")

    @classmethod
    def from_attributes(
        cls,
        labels: np.ndarray,
        attributes: np.ndarray,
        image_ids: np.ndarray,
        n_classes: int,
        n_attributes: int,
    ) -> GroupedSplit:
        """A split with one attribute of ``n_attributes`` bins (pseudo-groups, tests)."""
        attributes = np.asarray(attributes, dtype=np.int64)
        return cls(
            labels=np.asarray(labels, dtype=np.int64),
            bins=attributes[:, None],
            bin_counts=(int(n_attributes),),
            image_ids=np.asarray(image_ids),
            n_classes=n_classes,
            values=attributes[:, None].astype(np.float64),
            attribute_names=("attribute",),
            continuous=(False,),
        )

    @cached_property
    def attributes(self) -> np.ndarray:
        """The intersectional attribute bin of every row."""
        return intersection_index(self.bins, self.bin_counts)

    @property
    def n_attributes(self) -> int:
        return math.prod(self.bin_counts)

    @cached_property
    def groups(self) -> np.ndarray:
        return self.labels * self.n_attributes + self.attributes

    @property
    def n_groups(self) -> int:
        return self.n_classes * self.n_attributes

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: np.ndarray) -> GroupedSplit:
        """The given rows only (e.g. validation rows a method did not train on)."""
        return replace(
            self,
            labels=self.labels[rows],
            bins=self.bins[rows],
            image_ids=self.image_ids[rows],
            values=None if self.values is None else self.values[rows],
        )

    def group_counts(self) -> np.ndarray:
        """Rows per group, shape ``(n_groups,)``."""
        return np.bincount(self.groups, minlength=self.n_groups)

    def attribute_given_class(self) -> np.ndarray:
        """alpha[y, a] = |X_ya| / |X_y|, shape ``(n_classes, n_attributes)``."""
        counts = self.group_counts().reshape(self.n_classes, self.n_attributes).astype(float)
        totals = counts.sum(axis=1, keepdims=True)
        return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)

    def with_attributes(self, attributes: np.ndarray, n_attributes: int) -> GroupedSplit:
        """The same rows with one other attribute (pseudo-groups of unknown attributes)."""
        return GroupedSplit.from_attributes(
            self.labels, attributes, self.image_ids, self.n_classes, n_attributes
        )


@dataclass
class Batch:
    """One batch. ``index`` holds row numbers of the split it was drawn from."""

    x: torch.Tensor
    y: torch.Tensor
    attribute: torch.Tensor
    """Intersectional attribute bin of each row."""
    group: torch.Tensor
    index: torch.Tensor
    bins: torch.Tensor | None = None
    """``(B, d)`` per-attribute bins."""
    values: torch.Tensor | None = None
    """``(B, d)`` float32 raw attribute values."""
    mask: torch.Tensor | None = None
    """``(B, S, S)`` tumor masks in [0, 1], when the patch set stores them."""

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """A batch with ``fn`` applied to every tensor field (``None`` stays ``None``)."""
        items = ((f.name, getattr(self, f.name)) for f in fields(self))
        return Batch(**{name: None if t is None else fn(t) for name, t in items})

    def select(self, rows: slice | torch.Tensor) -> Batch:
        """The rows ``rows`` of every field (e.g. GERNE's biased and less-biased halves)."""
        return self._map(lambda t: t[rows])

    def to(self, device: torch.device) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def __len__(self) -> int:
        return len(self.y)
