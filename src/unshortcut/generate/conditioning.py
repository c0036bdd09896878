"""What the generator is conditioned on, and how each condition becomes an embedding.

As in MeDi, every condition (the label, the tissue ratio, each categorical metadata
column) gets its own embedding, and the embeddings are summed into the U-Net's time
embedding. Categorical conditions use a lookup table; continuous ones (the tissue
ratio) a sinusoidal encoding of the value followed by a small MLP, so nearby values
get nearby embeddings and any value in the training range can be asked for.

Conditions travel as one float tensor ``(N, K)``: a category index or a continuous
value scaled to [0, 1] by the training range, and NaN for "no condition". A NaN
selects the condition's learned *null* embedding: condition dropout during training
writes NaNs, and classifier-free guidance's unconditional pass is all NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

from unshortcut.errors import UnshortcutError
from unshortcut.groups import category_index
from unshortcut.tiling.patchset import REQUIRED_COLUMNS

LABEL = "label"
# Default continuous condition; categorical metadata columns join it automatically.
TISSUE = "tissue_ratio"
# Automatic conditioning skips text columns with more distinct training values.
MAX_AUTO_CATEGORIES = 32
# Continuous values in [0, 1] are spread over this range before the sinusoids.
_SINUSOID_SCALE = 1000.0


@dataclass(frozen=True)
class Condition:
    """One conditioning column: categorical (``categories``) or continuous (``low..high``)."""

    column: str
    categories: tuple[str, ...] = ()
    low: float = 0.0
    high: float = 1.0

    @property
    def categorical(self) -> bool:
        return bool(self.categories)

    def encode(self, values: pd.Series, source: str) -> np.ndarray:
        """Category index or scaled value per row (float64); unseen categories are refused."""
        if values.isna().any():
            raise UnshortcutError(f"{source}: column '{self.column}' has missing values")
        if self.categorical:
            unseen_means = "the generator was not trained on"
            index = category_index(values, self.categories, self.column, source, unseen_means)
            return index.astype(np.float64)
        return (values.to_numpy(np.float64) - self.low) / (self.high - self.low)

    def to_dict(self) -> dict[str, Any]:
        if self.categorical:
            return {"column": self.column, "categories": list(self.categories)}
        return {"column": self.column, "low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Condition:
        return cls(
            column=str(data["column"]),
            categories=tuple(str(c) for c in data.get("categories", ())),
            low=float(data.get("low", 0.0)),
            high=float(data.get("high", 1.0)),
        )


def fit_conditions(train: pd.DataFrame, requested: Sequence[str], source: str) -> list[Condition]:
    """The label first, then the requested columns (or the automatic choice), fitted on ``train``.

    ``requested`` entries are column names, optionally with ``:cat`` or ``:num``; a
    bare name is categorical when the column is not numeric. Empty means: the tissue
    ratio and every text or boolean metadata column with 2..32 training values.
    """
    specs = [_parse(text) for text in requested] if requested else _automatic(train)
    columns = [column for column, _ in specs]
    if LABEL in columns:
        raise UnshortcutError(f"conditions: '{LABEL}' is always a condition; do not list it")
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise UnshortcutError(f"conditions: {', '.join(repeated)} given more than once")
    conditions = [Condition(LABEL, categories=("0", "1"))]
    for column, kind in specs:
        if column not in train.columns:
            available = ", ".join(map(str, train.columns))
            raise UnshortcutError(f"{source}: no column '{column}' to condition on ({available})")
        values = train[column]
        if values.isna().any():
            raise UnshortcutError(f"{source}: column '{column}' has missing values")
        categorical = kind == "cat" or (kind is None and not _is_numeric(values))
        if categorical:
            conditions.append(Condition(column, categories=tuple(sorted(set(values.astype(str))))))
            continue
        if not _is_numeric(values):
            raise UnshortcutError(f"{source}: column '{column}' is not numeric (use {column}:cat)")
        low, high = float(values.min()), float(values.max())
        conditions.append(Condition(column, low=low, high=high if high > low else low + 1.0))
    return conditions


def _parse(text: str) -> tuple[str, str | None]:
    column, colon, kind = text.strip().rpartition(":")
    if not colon:
        return kind, None
    if kind not in ("cat", "num") or not column:
        raise UnshortcutError(
            f"conditions: {text!r} reads like 'column', 'column:cat' or 'column:num'"
        )
    return column, kind


def _automatic(train: pd.DataFrame) -> list[tuple[str, str | None]]:
    specs: list[tuple[str, str | None]] = [(TISSUE, "num")]
    for column in train.columns:
        if column in REQUIRED_COLUMNS or _is_numeric(train[column]):
            continue
        if 2 <= train[column].astype(str).nunique() <= MAX_AUTO_CATEGORIES:
            specs.append((column, "cat"))
    return specs


def _is_numeric(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


class ConditionEncoder:
    """Turns table rows into the ``(N, K)`` condition tensor the model reads."""

    def __init__(self, conditions: Sequence[Condition]) -> None:
        if not conditions or conditions[0].column != LABEL:
            raise ValueError("the label must be the first condition")
        self.conditions = tuple(conditions)

    @property
    def columns(self) -> list[str]:
        return [c.column for c in self.conditions]

    def __len__(self) -> int:
        return len(self.conditions)

    def encode(self, table: pd.DataFrame, source: str = "table") -> np.ndarray:
        """``(len(table), K)`` float32 conditions of the given rows."""
        for column in self.columns:
            if column not in table.columns:
                raise UnshortcutError(f"{source}: no column '{column}' (a generator condition)")
        encoded = [c.encode(table[c.column], source) for c in self.conditions]
        return np.stack(encoded, axis=1).astype(np.float32)

    def condition(self, column: str) -> Condition | None:
        return next((c for c in self.conditions if c.column == column), None)

    def to_list(self) -> list[dict[str, Any]]:
        return [c.to_dict() for c in self.conditions]

    @classmethod
    def from_list(cls, data: list[dict[str, Any]]) -> ConditionEncoder:
        return cls([Condition.from_dict(d) for d in data])


class ContinuousEmbedding(nn.Module):
    """Sinusoids of the scaled value, then Linear-SiLU-Linear; NaN gives the null vector."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.sinusoid_dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.null = nn.Parameter(torch.randn(dim))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        missing = torch.isnan(values)
        encoded = get_timestep_embedding(
            torch.where(missing, 0.0, values) * _SINUSOID_SCALE, self.sinusoid_dim
        )
        embedded = self.mlp(encoded.to(self.null.dtype))
        return torch.where(missing[:, None], self.null.expand_as(embedded), embedded)


class CategoricalEmbedding(nn.Module):
    """One learned vector per category plus one for "no condition" (the last row)."""

    def __init__(self, n_categories: int, dim: int) -> None:
        super().__init__()
        self.null_index = n_categories
        self.table = nn.Embedding(n_categories + 1, dim)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        index = torch.where(torch.isnan(values), float(self.null_index), values)
        return self.table(index.long())


class ConditionEmbedding(nn.Module):
    """The sum of one embedding per condition (MeDi), added to the time embedding.

    It takes the place of ``DiffusionModelUNet.class_embedding``, whose forward adds
    ``class_embedding(class_labels)`` to the time embedding: that is exactly MeDi's
    conditioning once the lookup is replaced by this sum over conditions.
    """

    def __init__(self, conditions: Sequence[Condition], dim: int) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(
            CategoricalEmbedding(len(c.categories), dim)
            if c.categorical
            else ContinuousEmbedding(dim)
            for c in conditions
        )

    def forward(self, conditions: torch.Tensor) -> torch.Tensor:
        if conditions.ndim != 2 or conditions.shape[1] != len(self.embeddings):
            raise ValueError(
                f"conditions of shape {tuple(conditions.shape)}, "
                f"expected (N, {len(self.embeddings)})"
            )
        parts = [embed(conditions[:, k]) for k, embed in enumerate(self.embeddings)]
        return torch.stack(parts).sum(dim=0)


def null_conditions(n: int, k: int) -> torch.Tensor:
    """All conditions absent: the unconditional input of classifier-free guidance."""
    return torch.full((n, k), float("nan"))
