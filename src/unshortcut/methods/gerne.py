"""GERNE: gradient extrapolation for debiased representation learning (arXiv 2503.13236).

Every step draws two class-balanced batches of ``B = batch_size // (2K)`` rows per class,
so the two together hold the run's batch size:

- a *biased* batch with the training set's own attribute distribution
  ``p_b(a|y) = alpha_ya = |X_ya| / |X_y|``,
- a *less-biased* batch with ``p_lb(a|y) = (1 - c) alpha_ya + c / A``,

and steps on the extrapolated loss ``L_ext = L_lb + beta (L_lb - L_b)``. Because
``L_ext`` is linear in the per-sample losses, one forward pass over both batches
concatenated and one backward pass give exactly ``(1 + beta) grad L_lb - beta grad L_b``:
the price of ERM, not of two passes. In expectation the step equals training on
``p_ext(a|y) = alpha_ya + c (beta + 1) (1/A - alpha_ya)``, which stays a distribution
for ``beta`` up to ``beta_max = alpha_max / (c (alpha_max - 1/A)) - 1``.

``gerne_unknown`` (Algorithm 2) builds pseudo-attributes from a biased model's
low-confidence rows and runs the same update on them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from unshortcut.errors import UnshortcutError
from unshortcut.methods.base import Batch, GroupedSplit, HParam, Method
from unshortcut.methods.registry import register
from unshortcut.methods.sampling import draw_class_conditional, rows_by_group

BN_MODES: tuple[str, ...] = ("shared", "frozen")


def less_biased_distribution(alpha: np.ndarray, c: float) -> np.ndarray:
    """p_lb(a|y) = (1 - c) alpha_ya + c / A, shape ``(K, A)``."""
    alpha = np.asarray(alpha, dtype=float)
    return (1.0 - c) * alpha + c / alpha.shape[1]


def simulated_attribute_distribution(alpha: np.ndarray, c: float, beta: float) -> np.ndarray:
    """p_ext(a|y) = alpha_ya + c (beta + 1) (1/A - alpha_ya): what the extrapolated step
    trains on in expectation, ``(1 + beta) p_lb - beta p_b``."""
    alpha = np.asarray(alpha, dtype=float)
    return alpha + c * (beta + 1.0) * (1.0 / alpha.shape[1] - alpha)


def beta_max(alpha: np.ndarray, c: float) -> float:
    """Largest beta for which p_ext stays non-negative (infinite when alpha is uniform)."""
    alpha = np.asarray(alpha, dtype=float)
    top = float(alpha.max())
    gap = top - 1.0 / alpha.shape[1]
    if gap <= 1e-12:
        return math.inf
    return top / (c * gap) - 1.0


def extrapolated_loss(
    losses_biased: torch.Tensor, losses_less_biased: torch.Tensor, beta: float
) -> torch.Tensor:
    """L_ext = (1 + beta) L_lb - beta L_b from per-sample losses of the two batches."""
    return (1.0 + beta) * losses_less_biased.mean() - beta * losses_biased.mean()


@contextlib.contextmanager
def frozen_batchnorm(model: nn.Module, frozen: bool) -> Iterator[None]:
    """Put BatchNorm layers in eval mode (running statistics) for the block when ``frozen``."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)] if frozen else []
    modes = [m.training for m in layers]
    for layer in layers:
        layer.eval()
    try:
        yield
    finally:
        for layer, mode in zip(layers, modes, strict=True):
            layer.train(mode)


def _shard_length(n: int) -> int:
    """Rows of the first ``n`` batch rows that this rank holds: the loop shards a batch
    with ``index[rank::world]`` under torch.distributed, which keeps the biased rows first."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return len(range(torch.distributed.get_rank(), n, torch.distributed.get_world_size()))
    return n


def _check_groups(method: str, counts: np.ndarray, remedy: str) -> None:
    """Refuse empty groups: the less-biased batch must draw from every group (c > 0)."""
    for y, a in zip(*np.nonzero(counts == 0), strict=True):
        n_attributes = counts.shape[1]
        raise UnshortcutError(
            f"method {method!r}: training group {y * n_attributes + a} (class {y}, attribute "
            f"bin {a}) has no rows, but the less-biased batch draws c/A of every class from "
            f"it; {remedy}"
        )


@register
class GERNE(Method):
    """GERNE with known training attributes (Algorithm 1)."""

    name = "gerne"
    summary = "extrapolates the gradient from a biased to a less-biased batch"
    needs_train_attributes = True
    hparams: ClassVar[dict[str, HParam]] = {
        "c": HParam(0.5, 0.05, 1.0, help="share of the uniform p(a|y) in the less-biased batch"),
        "beta": HParam(0.5, -1.0, 2.0, help="extrapolation factor, in [-1, beta_max]"),
        "bn": HParam("shared", help="BatchNorm during the step: 'shared' or 'frozen'"),
    }

    empty_group_remedy = "use fewer attribute bins or thresholds that populate every group"

    @classmethod
    def group_counts(cls, hp: dict[str, Any], train: GroupedSplit) -> np.ndarray:
        """Rows per (class, attribute bin) that the sampler will see, shape ``(K, A)``."""
        return train.group_counts().reshape(train.n_classes, train.n_attributes)

    @classmethod
    def check_hparams(cls, hp: dict[str, Any], train: GroupedSplit) -> None:
        c, beta, bn = float(hp["c"]), float(hp["beta"]), hp["bn"]
        if bn not in BN_MODES:
            raise UnshortcutError(f"method {cls.name!r}: bn={bn!r} is not one of {BN_MODES}")
        if not 0.0 < c <= 1.0:
            raise UnshortcutError(f"method {cls.name!r}: c={c} must lie in (0, 1]")
        counts = cls.group_counts(hp, train)
        _check_groups(cls.name, counts, cls.empty_group_remedy)
        alpha = counts / counts.sum(axis=1, keepdims=True)
        bound = beta_max(alpha, c)
        if not -1.0 <= beta <= bound + 1e-9:
            raise UnshortcutError(
                f"method {cls.name!r}: beta={beta} is outside [-1, {bound:.4g}]; beta_max = "
                f"alpha_max / (c (alpha_max - 1/A)) - 1 with alpha_max={alpha.max():.4g}, "
                f"c={c}, A={alpha.shape[1]}; beyond it the simulated p(a|y) turns negative"
            )

    def validate(self) -> None:
        super().validate()
        if self.ctx.batch_size < 2 * self.ctx.train.n_classes:
            raise UnshortcutError(
                f"method {self.name!r}: batch size {self.ctx.batch_size} is below 2 x "
                f"{self.ctx.train.n_classes} classes (two class-balanced batches)"
            )

    @property
    def per_class(self) -> int:
        """B: rows per class in each of the two batches."""
        return self.ctx.batch_size // (2 * self.ctx.train.n_classes)

    def sampling_split(self) -> GroupedSplit:
        """The rows with the attribute bins GERNE balances (true attributes here)."""
        return self.ctx.train

    def epoch_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """Each batch: the biased rows first, then the less-biased rows (same size)."""
        split = self.sampling_split()
        members = rows_by_group(split)
        p_biased = split.attribute_given_class()
        p_less = less_biased_distribution(p_biased, float(self.hp["c"]))
        for _ in range(self.steps_per_epoch()):
            biased = draw_class_conditional(
                rng, members, split.n_attributes, self.per_class, p_biased
            )
            less = draw_class_conditional(rng, members, split.n_attributes, self.per_class, p_less)
            yield np.concatenate([biased, less])

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """One forward over both batches; rows keep the order ``epoch_batches`` gave."""
        half = _shard_length(self.per_class * self.ctx.train.n_classes)
        if len(batch.y) != _shard_length(2 * self.per_class * self.ctx.train.n_classes):
            raise RuntimeError(
                f"gerne: expected {2 * half} rows (biased + less-biased), got {len(batch.y)}"
            )
        with frozen_batchnorm(model, self.hp["bn"] == "frozen"):
            logits = model(batch.x)
        losses = F.cross_entropy(logits, batch.y, reduction="none")
        return extrapolated_loss(losses[:half], losses[half:], float(self.hp["beta"]))


def pseudo_minority(probs: np.ndarray, labels: np.ndarray, t: float) -> np.ndarray:
    """Attribute 1 for the ``floor(t |X_y|)`` rows of each class whose true-class
    probability is lowest (ties broken by row order), 0 for the rest."""
    attributes = np.zeros(len(labels), dtype=np.int64)
    for y in np.unique(labels):
        rows = np.flatnonzero(labels == y)
        order = np.argsort(probs[rows, y], kind="stable")
        attributes[rows[order[: math.floor(t * len(rows))]]] = 1
    return attributes


def identification_report(train: GroupedSplit, pseudo: np.ndarray) -> dict[str, Any]:
    """Precision and recall of the pseudo-minority against the true minority groups
    (groups with alpha_ya < 1/A); ``None`` when the training attributes are unknown."""
    report: dict[str, Any] = {"pseudo_minority_rows": int(pseudo.sum())}
    if train.n_attributes < 2:
        return report | {"precision": None, "recall": None, "true_minority_rows": None}
    alpha = train.attribute_given_class().ravel()
    true = alpha[train.groups] < 1.0 / train.n_attributes
    hits = int(np.sum(true & (pseudo == 1)))
    return report | {
        "true_minority_rows": int(true.sum()),
        "precision": hits / pseudo.sum() if pseudo.sum() else None,
        "recall": hits / true.sum() if true.sum() else None,
    }


@register
class GERNEUnknown(GERNE):
    """GERNE without training attributes (Algorithm 2): pseudo-groups from a biased model."""

    name = "gerne_unknown"
    summary = "GERNE on pseudo-attributes: low-confidence rows of a biased model"
    needs_train_attributes = False
    hparams: ClassVar[dict[str, HParam]] = {
        "t": HParam(0.2, 0.05, 0.45, help="share of each class taken as pseudo-minority"),
        "epochs": HParam(1, 1, 5, integer=True, help="epochs of the biased identification model"),
        **GERNE.hparams,
    }

    empty_group_remedy = "raise t so that floor(t |X_y|) >= 1 in every class"

    def __init__(self, ctx: Any, **hp: Any) -> None:
        self.pseudo: np.ndarray | None = None
        self.report: dict[str, Any] = {}
        super().__init__(ctx, **hp)

    @classmethod
    def group_counts(cls, hp: dict[str, Any], train: GroupedSplit) -> np.ndarray:
        t = float(hp["t"])
        if not 0.0 < t < 0.5:
            raise UnshortcutError(f"method {cls.name!r}: t={t} must lie in (0, 0.5)")
        sizes = np.bincount(train.labels, minlength=train.n_classes)
        minority = np.floor(t * sizes).astype(np.int64)
        return np.stack([sizes - minority, minority], axis=1)

    def prepare(self) -> None:
        biased = self.ctx.fit_auxiliary(
            epochs=int(self.hp["epochs"]),
            lr_factor=0.1,
            weight_decay_factor=2.0,
            class_balanced=True,
            select_by="balanced_accuracy",
        )
        probs = self.ctx.predict(biased, "train")
        self.pseudo = pseudo_minority(probs, self.ctx.train.labels, float(self.hp["t"]))
        self.report = identification_report(self.ctx.train, self.pseudo)

    def sampling_split(self) -> GroupedSplit:
        if self.pseudo is None:
            raise RuntimeError("gerne_unknown: prepare() must run before sampling")
        return self.ctx.train.with_attributes(self.pseudo, 2)

    def run_report(self) -> dict[str, Any]:
        """Precision/recall of the pseudo-minority against the true minority groups."""
        return {"pseudo_groups": dict(self.report)}

    def state_dict(self) -> dict[str, Any]:
        pseudo = None if self.pseudo is None else torch.from_numpy(self.pseudo)
        return {"pseudo_attributes": pseudo, "report": dict(self.report)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pseudo = state["pseudo_attributes"]
        self.pseudo = None if pseudo is None else np.asarray(pseudo, dtype=np.int64)
        self.report = dict(state["report"])
