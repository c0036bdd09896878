"""GERNE: gradient extrapolation for debiased representation learning (arXiv 2503.13236).

Every step draws two class-balanced batches of ``B = batch_size // (2K)`` rows per class,
so the two together hold the run's batch size:

- a *biased* batch with the training set's own attribute distribution
  ``p_b(a|y) = alpha_ya = |X_ya| / |X_y|``,
- a *less-biased* batch with ``p_lb(a|y) = (1 - c) alpha_ya + c / A``,

and steps on the extrapolated loss ``L_ext = L_lb + beta (L_lb - L_b)``, whose gradient
is ``g_lb + beta (g_lb - g_b)``. In expectation the step equals training on
``p_ext(a|y) = alpha_ya + c (beta + 1) (1/A - alpha_ya)``, which stays a distribution
for ``beta`` up to ``beta_max = alpha_max / (c (alpha_max - 1/A)) - 1``. What sets the
simulated distribution is the strength ``s = c (beta + 1)`` (s = 1: uniform p(a|y), as
group resampling; ``s_max = alpha_max / (alpha_max - 1/A)`` whatever c), so the search
draws s over its feasible range and c from {0.5, 1} as in the paper.

BatchNorm (``bn``):

- ``separate`` (default, the paper's update): one forward pass per batch, so each batch
  is normalised with its own statistics, then one backward pass of ``L_ext``. The step is
  exactly ``g_lb + beta (g_lb - g_b)`` of two separately computed losses.
- ``joint``: one forward pass over both batches concatenated (their statistics mix), one
  backward. Cheaper on small models, but not the paper's step: with BatchNorm it differs
  from it, and beta = -1 is then no longer class-balanced ERM.
- ``frozen``: running statistics during the step (for pretrained models; a model
  trained from scratch would keep its initial 0/1 statistics).

Runaway: ``L_ext`` is a non-negative mixture of group losses in expectation, so an
epoch whose mean ``L_ext`` is negative means the model has learned to tell the two
batches apart (per-batch BatchNorm statistics make that possible) and to raise the
biased batch's loss without bound. GERNE then warns in words and, by default, ends
training (``on_runaway``); checkpoint selection keeps the best earlier epoch.

``gerne_unknown`` (Algorithm 2) builds pseudo-attributes from a biased model's
low-confidence rows and runs the same update on them.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from unshortcut import distributed
from unshortcut.distributed import global_mean
from unshortcut.errors import UnshortcutError
from unshortcut.methods.base import HParam, Method, Optimizers, backward_and_step
from unshortcut.methods.registry import get_method, register
from unshortcut.methods.sampling import draw_class_conditional, rows_by_group
from unshortcut.rows import Batch, GroupedSplit

BN_MODES: tuple[str, ...] = ("separate", "joint", "frozen")
RUNAWAY_ACTIONS: tuple[str, ...] = ("stop", "warn")
STRENGTH_LOW = 0.5
"""Smallest strength s = c (beta + 1) the search draws (s = 1 is group resampling)."""
STRENGTH_CAP = 4.0
"""Largest strength drawn: the bound grows without limit as p(a|y) nears uniform."""
C_CHOICES: tuple[float, ...] = (0.5, 1.0)


def less_biased_distribution(alpha: np.ndarray, c: float) -> np.ndarray:
    """p_lb(a|y) = (1 - c) alpha_ya + c / A, shape ``(K, A)``."""
    alpha = np.asarray(alpha, dtype=float)
    return (1.0 - c) * alpha + c / alpha.shape[1]


def simulated_attribute_distribution(alpha: np.ndarray, c: float, beta: float) -> np.ndarray:
    """p_ext(a|y) = alpha_ya + c (beta + 1) (1/A - alpha_ya): what the extrapolated step
    trains on in expectation, ``(1 + beta) p_lb - beta p_b``."""
    alpha = np.asarray(alpha, dtype=float)
    return alpha + c * (beta + 1.0) * (1.0 / alpha.shape[1] - alpha)


def max_strength(alpha: np.ndarray) -> float:
    """s_max = alpha_max / (alpha_max - 1/A): the largest c (beta + 1) keeping p_ext >= 0
    (infinite when alpha is uniform)."""
    alpha = np.asarray(alpha, dtype=float)
    top = float(alpha.max())
    gap = top - 1.0 / alpha.shape[1]
    return math.inf if gap <= 1e-12 else top / gap


def beta_max(alpha: np.ndarray, c: float) -> float:
    """Largest beta for which p_ext stays non-negative (infinite when alpha is uniform)."""
    return max_strength(alpha) / c - 1.0


def extrapolated_loss(
    losses_biased: torch.Tensor, losses_less_biased: torch.Tensor, beta: float
) -> torch.Tensor:
    """L_ext = (1 + beta) L_lb - beta L_b from per-sample losses of the two batches
    (each a mean over its whole batch, also when ranks hold shares of it)."""
    return (1.0 + beta) * global_mean(losses_less_biased) - beta * global_mean(losses_biased)


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


@contextlib.contextmanager
def batchnorm_per_block(model: nn.Module, sizes: list[int]) -> Iterator[None]:
    """BatchNorm layers normalise each consecutive block of rows with its own statistics.

    One forward pass over the biased rows followed by the less-biased rows then computes
    exactly what a forward pass per batch computes (per-sample layers do not care, and
    each BatchNorm layer sees and updates its running statistics with the blocks in the
    same order), at the cost of one pass, and under DDP as one forward per backward.
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for layer in layers:
        original = layer.forward
        layer.forward = lambda x, f=original: torch.cat([f(part) for part in x.split(sizes)])
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the class's own forward again


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
        "c": HParam(0.5, choices=C_CHOICES, help="uniform share of the less-biased p(a|y)"),
        "beta": HParam(0.5, help="extrapolation factor in [-1, beta_max], searched via s"),
        "bn": HParam("separate", help="BatchNorm during the step: separate, joint or frozen"),
        "on_runaway": HParam("stop", help="when the extrapolated loss runs away: stop or warn"),
    }

    empty_group_remedy = "use fewer attribute bins or thresholds that populate every group"

    @classmethod
    def group_counts(cls, hp: dict[str, Any], train: GroupedSplit) -> np.ndarray:
        """Rows per (class, attribute bin) that the sampler will see, shape ``(K, A)``."""
        return train.group_counts().reshape(train.n_classes, train.n_attributes)

    @classmethod
    def strength_range(cls, hp: dict[str, Any], train: GroupedSplit | None) -> tuple[float, float]:
        """The strengths s = c (beta + 1) the search covers: [STRENGTH_LOW, s_max]."""
        high = STRENGTH_CAP
        if train is not None:
            counts = cls.group_counts(hp, train)
            if counts.all():
                high = min(max_strength(counts / counts.sum(axis=1, keepdims=True)), high)
        return STRENGTH_LOW, max(high, STRENGTH_LOW)

    @classmethod
    def draw_hparams(
        cls, rng_for: Callable[[str], np.random.Generator], train: GroupedSplit | None
    ) -> dict[str, Any]:
        """c from {0.5, 1}; beta from a strength s uniform over its feasible range."""
        hp = super().draw_hparams(rng_for, train)
        low, high = cls.strength_range(hp, train)
        hp["beta"] = float(rng_for("beta").uniform(low, high)) / float(hp["c"]) - 1.0
        return hp

    @classmethod
    def grid_hparams(cls, points: int, train: GroupedSplit | None) -> list[dict[str, Any]]:
        """c in {0.5, 1} crossed with ``points`` strengths over the feasible range."""
        grid = []
        for hp in super().grid_hparams(points, train):
            low, high = cls.strength_range(hp, train)
            strengths = np.linspace(low, high, points) if points > 1 else [1.0]
            grid += [hp | {"beta": float(s) / float(hp["c"]) - 1.0} for s in strengths]
        return grid

    @classmethod
    def check_hparams(cls, hp: dict[str, Any], train: GroupedSplit) -> None:
        c, beta = float(hp["c"]), float(hp["beta"])
        if hp["bn"] not in BN_MODES:
            raise UnshortcutError(f"method {cls.name!r}: bn={hp['bn']!r} is not one of {BN_MODES}")
        if hp["on_runaway"] not in RUNAWAY_ACTIONS:
            raise UnshortcutError(
                f"method {cls.name!r}: on_runaway={hp['on_runaway']!r} is not one of "
                f"{RUNAWAY_ACTIONS}"
            )
        if not 0.0 < c <= 1.0:
            raise UnshortcutError(f"method {cls.name!r}: c={c} must lie in (0, 1]")
        if beta < -1.0:
            raise UnshortcutError(
                f"method {cls.name!r}: beta={beta} is below -1; beta = -1 already trains on "
                "the biased batch alone (class-balanced ERM), and smaller values step away "
                "from the less-biased batch"
            )
        counts = cls.group_counts(hp, train)
        _check_groups(cls.name, counts, cls.empty_group_remedy)
        alpha = counts / counts.sum(axis=1, keepdims=True)
        bound = beta_max(alpha, c)
        if beta > bound + 1e-9:
            raise UnshortcutError(
                f"method {cls.name!r}: beta={beta} is outside [-1, {bound:.4g}]; beta_max = "
                f"alpha_max / (c (alpha_max - 1/A)) - 1 with alpha_max={alpha.max():.4g}, "
                f"c={c}, A={alpha.shape[1]}; beyond it the simulated p(a|y) turns negative"
            )

    def __init__(self, ctx: Any, **hp: Any) -> None:
        self.runaway: str | None = None
        super().__init__(ctx, **hp)

    def validate(self) -> None:
        super().validate()
        if self.ctx.batch_size < 2 * self.ctx.train.n_classes:
            raise UnshortcutError(
                f"method {self.name!r}: batch size {self.ctx.batch_size} is below 2 x "
                f"{self.ctx.train.n_classes} classes (two class-balanced batches)"
            )
        if self.hp["bn"] == "frozen" and not self.ctx.pretrained:
            warnings.warn(
                f"method {self.name!r}: bn=frozen on a model trained from scratch keeps its "
                "BatchNorm running statistics at their initial 0/1 during every step; use it "
                "with --pretrained, or bn=separate",
                stacklevel=2,
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

    def half_losses(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row losses of the biased and the less-biased batch (rows in batch order).

        Under data parallelism each rank holds the strided share of the batch, which keeps
        the biased rows first.
        """
        n_half = self.per_class * self.ctx.train.n_classes
        half = distributed.share_length(n_half)
        if len(batch) != distributed.share_length(2 * n_half):
            raise RuntimeError(
                f"gerne: expected {2 * half} rows (biased + less-biased), got {len(batch)}"
            )
        bn = self.hp["bn"]
        context = (
            batchnorm_per_block(model, [half, len(batch) - half])
            if bn == "separate"
            else frozen_batchnorm(model, bn == "frozen")
        )
        with context:
            losses = self.per_sample_loss(model, batch)
        return losses[:half], losses[half:]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return extrapolated_loss(*self.half_losses(model, batch), float(self.hp["beta"]))

    def train_step(
        self, model: nn.Module, batch: Batch, optimizers: Optimizers
    ) -> dict[str, float]:
        """One backward of L_ext; logs L_ext and the two batches' losses."""
        biased, less = self.half_losses(model, batch)
        loss = extrapolated_loss(biased, less, float(self.hp["beta"]))
        backward_and_step(loss, optimizers.values())
        return {
            "loss": float(loss.detach()),
            "loss_biased": float(global_mean(biased.detach())),
            "loss_less_biased": float(global_mean(less.detach())),
        }

    def on_epoch_end(self, epoch: int, model: nn.Module, terms: dict[str, float]) -> None:
        """Flag a runaway: a negative mean extrapolated loss over the epoch."""
        if self.runaway is not None or terms.get("loss", 0.0) >= 0.0:
            return
        self.runaway = (
            f"method {self.name!r}: the extrapolated loss ran away at epoch {epoch} (mean "
            f"{terms['loss']:.3f} < 0, biased-batch loss {terms['loss_biased']:.3f} growing): "
            "the model raises the biased batch's loss instead of lowering the less-biased "
            f"one; lower beta (now {self.hp['beta']:g}) or use bn=joint"
        )
        action = "training stops here" if self.hp["on_runaway"] == "stop" else "training goes on"
        warnings.warn(f"{self.runaway}; {action}", stacklevel=2)

    def stop_reason(self) -> str | None:
        return self.runaway if self.hp["on_runaway"] == "stop" else None

    def run_report(self) -> dict[str, Any]:
        return {"runaway": self.runaway}

    def state_dict(self) -> dict[str, Any]:
        return {"runaway": self.runaway}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.runaway = state["runaway"]


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
        "t": HParam(0.2, 1e-3, 0.45, log=True, help="share of each class taken as pseudo-minority"),
        "epochs": HParam(3, 3, 6, integer=True, help="epochs of the biased identification model"),
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
            get_method("cb_erm")(self.ctx),
            epochs=int(self.hp["epochs"]),
            lr_factor=0.1,
            weight_decay_factor=2.0,
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
        return super().run_report() | {"pseudo_groups": dict(self.report)}

    def state_dict(self) -> dict[str, Any]:
        pseudo = None if self.pseudo is None else torch.from_numpy(self.pseudo)
        return super().state_dict() | {"pseudo_attributes": pseudo, "report": dict(self.report)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        pseudo = state["pseudo_attributes"]
        self.pseudo = None if pseudo is None else np.asarray(pseudo, dtype=np.int64)
        self.report = dict(state["report"])
