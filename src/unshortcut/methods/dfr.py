"""Deep Feature Reweighting (Kirichenko et al., 2023): retrain only the last layer.

Train ERM as usual; then, in ``finalize``, fit an L1-regularised logistic regression on
the frozen penultimate features of a group-balanced subsample of *validation* rows,
average the coefficients over several subsamples and install them as the head.

Validation rows are split by image into two halves, fixed at construction: one half
fits the head (``reserved_val_rows``; the loop never scores those rows), the other stays
for checkpoint and hyperparameter selection, so no row is both fitted and scored.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import sklearn
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from unshortcut.errors import UnshortcutError
from unshortcut.methods.base import HParam, Method, TrainContext
from unshortcut.methods.registry import register
from unshortcut.rows import GroupedSplit

BALANCE_MODES: tuple[str, ...] = ("group", "class")


def l1_logistic_regression(C: float) -> LogisticRegression:
    """L1 logistic regression (liblinear, fixed seed so refits are reproducible).

    scikit-learn 1.8 deprecated ``penalty='l1'`` in favour of ``l1_ratio=1``, which older
    versions ignore outside elastic net, so the spelling follows the installed version.
    """
    major, minor = (int(part) for part in sklearn.__version__.split(".")[:2])
    penalty: dict[str, Any] = {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}
    return LogisticRegression(solver="liblinear", C=C, random_state=0, **penalty)


def split_rows_by_image(image_ids: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, kept rows): the images in a seeded random order, first half to fit."""
    images = np.unique(np.asarray(image_ids).astype(str))
    if len(images) < 2:
        raise UnshortcutError(
            "method 'dfr': the validation split holds fewer than 2 images; it is split by "
            "image into a head-fitting half and a selection half"
        )
    order = np.random.default_rng([seed, 0xDF2]).permutation(images)
    fit_images = order[: len(images) // 2]
    fit = np.isin(np.asarray(image_ids).astype(str), fit_images)
    return np.flatnonzero(fit), np.flatnonzero(~fit)


def balanced_subsample(strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions drawn without replacement: the smallest stratum's size from each stratum."""
    values, counts = np.unique(strata, return_counts=True)
    size = int(counts.min())
    chosen = [rng.choice(np.flatnonzero(strata == v), size=size, replace=False) for v in values]
    return np.sort(np.concatenate(chosen))


def fit_head(
    features: np.ndarray,
    labels: np.ndarray,
    strata: np.ndarray,
    *,
    n_classes: int,
    C: float,
    n_subsamples: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Head ``(weight (K, D), bias (K,))`` on raw features, averaged over subsamples.

    Features are standardised first (the L1 penalty should not depend on feature scale)
    and the scaling is folded back into the weights. For two classes the logistic
    regression's ``w x + b`` becomes the logit difference (``[0, w]``), so the head's
    softmax reproduces its probabilities exactly; for more, the one-vs-rest logits.
    """
    if len(np.unique(labels)) < n_classes:
        raise UnshortcutError("method 'dfr': the head-fitting validation half lacks a class")
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-8
    scaled = (features - mean) / std
    weight = np.zeros((n_classes, features.shape[1]))
    bias = np.zeros(n_classes)
    for _ in range(n_subsamples):
        rows = balanced_subsample(strata, rng)
        model = l1_logistic_regression(C)
        model.fit(scaled[rows], labels[rows])
        if n_classes == 2:
            weight[1] += model.coef_[0]
            bias[1] += model.intercept_[0]
        else:
            weight += model.coef_
            bias += model.intercept_
    weight, bias = weight / n_subsamples / std, bias / n_subsamples
    return weight, bias - weight @ mean


@register
class DFR(Method):
    """ERM training; last-layer retraining on half of validation in ``finalize``."""

    name = "dfr"
    summary = "ERM, then an L1 logistic head refit on group-balanced validation features"
    hparams: ClassVar[dict[str, HParam]] = {
        "C": HParam(1.0, 0.01, 10.0, log=True, help="inverse L1 strength of the head"),
        "n_subsamples": HParam(10, help="balanced subsamples whose heads are averaged"),
        "balance": HParam("group", help="'group' (val attributes) or 'class' (none needed)"),
    }

    def __init__(self, ctx: TrainContext, **hp: Any) -> None:
        super().__init__(ctx, **hp)
        self.fit_rows, self.kept_rows = split_rows_by_image(ctx.val.image_ids, ctx.seed)

    @classmethod
    def check_hparams(cls, hp: dict[str, Any], train: GroupedSplit) -> None:
        if hp["balance"] not in BALANCE_MODES:
            raise UnshortcutError(f"method 'dfr': balance={hp['balance']!r} not in {BALANCE_MODES}")
        if float(hp["C"]) <= 0 or int(hp["n_subsamples"]) < 1:
            raise UnshortcutError("method 'dfr': C must be > 0 and n_subsamples >= 1")

    @classmethod
    def uses_val_attributes(cls, hp: dict[str, Any]) -> bool:
        return hp.get("balance", cls.hparams["balance"].default) == "group"

    def reserved_val_rows(self) -> np.ndarray:
        return self.fit_rows

    def balance_strata(self) -> np.ndarray:
        """Per fit row: its validation group (or class) that subsamples balance."""
        val = self.ctx.val
        strata = val.groups if self.hp["balance"] == "group" else val.labels
        return strata[self.fit_rows]

    def finalize(self, model: nn.Module) -> nn.Module:
        head = model.last_layer()
        if not isinstance(head, nn.Linear):
            raise UnshortcutError(
                "method 'dfr': the model has no linear last layer from features to logits "
                "to retrain"
            )
        features = self.ctx.features(model, "val")[self.fit_rows]
        weight, bias = fit_head(
            features,
            self.ctx.val.labels[self.fit_rows],
            self.balance_strata(),
            n_classes=self.ctx.val.n_classes,
            C=float(self.hp["C"]),
            n_subsamples=int(self.hp["n_subsamples"]),
            rng=np.random.default_rng([self.ctx.seed, 0xDF3]),
        )
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
            head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
        return model
