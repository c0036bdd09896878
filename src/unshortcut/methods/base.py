"""The Method interface: how batches are drawn and which loss is stepped.

The training loop (``unshortcut.train``) owns the model, optimizer, checkpoints and
evaluation; a method only decides

- which training rows form each batch (``epoch_batches``),
- the loss to step for a batch (``loss``),
- optional work before training (``prepare``: JTT's error set, GERNE's pseudo-groups),
  after each epoch (``on_epoch_end``: GroupDRO bookkeeping), and after training
  (``finalize``: DFR's last-layer retraining).

Methods see the data only through :class:`GroupedSplit` arrays and the
:class:`TrainContext` services, so adding a method touches one new file and the
registry, nothing else. Everything a method keeps between steps must round-trip
through ``state_dict`` so that a killed run resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from unshortcut.errors import UnshortcutError


@dataclass(frozen=True)
class HParam:
    """A hyperparameter: its default and the range random search draws from."""

    default: Any
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] = ()
    help: str = ""

    def sample(self, rng: np.random.Generator) -> Any:
        """Draw one value from the search range (the default when there is none)."""
        if self.choices:
            return self.choices[int(rng.integers(len(self.choices)))]
        if self.low is None or self.high is None:
            return self.default
        if self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        return round(value) if self.integer else float(value)


@dataclass
class GroupedSplit:
    """What a method knows of one split: labels, attribute bins and groups per row.

    ``group = label * n_attributes + attribute``; ``attribute`` is the index of the
    (possibly intersectional) attribute bin. Row ``i`` here is row ``i`` of the
    split's batches (``Batch.index``).
    """

    labels: np.ndarray
    attributes: np.ndarray
    image_ids: np.ndarray
    n_classes: int
    n_attributes: int

    @property
    def groups(self) -> np.ndarray:
        return self.labels * self.n_attributes + self.attributes

    @property
    def n_groups(self) -> int:
        return self.n_classes * self.n_attributes

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: np.ndarray) -> GroupedSplit:
        """The given rows only (e.g. validation rows a method did not train on)."""
        return GroupedSplit(
            self.labels[rows],
            self.attributes[rows],
            self.image_ids[rows],
            self.n_classes,
            self.n_attributes,
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
        """The same rows with other attribute bins (pseudo-groups of unknown attributes)."""
        return GroupedSplit(self.labels, attributes, self.image_ids, self.n_classes, n_attributes)


@dataclass
class Batch:
    """One training batch. ``index`` holds the rows of ``TrainContext.train``."""

    x: torch.Tensor
    y: torch.Tensor
    attribute: torch.Tensor
    group: torch.Tensor
    index: torch.Tensor
    mask: torch.Tensor | None = None


class TrainContext(Protocol):
    """Services the training loop offers to methods."""

    train: GroupedSplit
    val: GroupedSplit
    batch_size: int
    seed: int
    device: torch.device

    def new_model(self) -> nn.Module:
        """A freshly initialised model of the run's architecture."""
        ...

    def fit_auxiliary(
        self,
        *,
        epochs: int,
        lr_factor: float = 1.0,
        weight_decay_factor: float = 1.0,
        class_balanced: bool = False,
        select_by: str = "last",
        row_weights: np.ndarray | None = None,
    ) -> nn.Module:
        """Train a plain ERM model with the run's settings scaled by the factors.

        ``select_by`` is "last" or a validation criterion (e.g. "worst_class_accuracy")
        evaluated each epoch; ``row_weights`` draws training rows with those
        probabilities. Used by JTT and GERNE (unknown attributes).
        """
        ...

    def predict(self, model: nn.Module, split: str) -> np.ndarray:
        """Class probabilities ``(N, K)`` for every row of ``split`` (no augmentation)."""
        ...

    def features(self, model: nn.Module, split: str) -> np.ndarray:
        """Penultimate features ``(N, D)`` for every row of ``split`` (no augmentation)."""
        ...


class Method:
    """Base class: plain ERM behaviour; subclasses override what they change."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    hparams: ClassVar[dict[str, HParam]] = {}
    # Whether the method reads training attributes (the 2 x 2 protocol: methods that do
    # are only compared where training attributes are known).
    needs_train_attributes: ClassVar[bool] = False

    @classmethod
    def check_hparams(cls, hp: dict[str, Any], train: GroupedSplit) -> None:
        """Raise UnshortcutError when ``hp`` makes no sense for ``train``.

        A classmethod so that hyperparameter search can discard infeasible draws
        before any run starts; ``validate`` calls it for the run's own values.
        """

    @classmethod
    def uses_val_attributes(cls, hp: dict[str, Any]) -> bool:
        """Whether training with ``hp`` reads validation attributes (DFR's balancing)."""
        return False

    def __init__(self, ctx: TrainContext, **hp: Any) -> None:
        unknown = sorted(set(hp) - set(self.hparams))
        if unknown:
            known = ", ".join(sorted(self.hparams)) or "none"
            raise UnshortcutError(
                f"method {self.name!r}: unknown hyperparameter(s) {', '.join(unknown)} "
                f"(known: {known})"
            )
        self.ctx = ctx
        self.hp: dict[str, Any] = {k: h.default for k, h in self.hparams.items()} | hp
        self.validate()

    def validate(self) -> None:
        """Refuse hyperparameters that make no sense for this training data."""
        self.check_hparams(self.hp, self.ctx.train)

    def prepare(self) -> None:
        """Work before the first epoch (not called when resuming: see ``state_dict``)."""

    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.ctx.train) / self.ctx.batch_size))

    def epoch_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """Row indices of each batch of ``epoch``; default: a shuffled pass."""
        order = rng.permutation(len(self.ctx.train))
        size = self.ctx.batch_size
        for start in range(0, len(order), size):
            yield order[start : start + size]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy; the scalar the loop backpropagates."""
        return F.cross_entropy(model(batch.x), batch.y)

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        """Per-epoch bookkeeping."""

    def finalize(self, model: nn.Module) -> nn.Module:
        """Post-training work; returns the model to evaluate."""
        return model

    def reserved_val_rows(self) -> np.ndarray:
        """Validation rows this method trains on (DFR); the loop scores validation
        (selection and metrics) on the other rows only. Fixed from construction on."""
        return np.zeros(0, dtype=np.int64)

    def run_report(self) -> dict[str, Any]:
        """Facts about the method's own work, written to metrics.json (``method_report``)."""
        return {}

    def extra_modules(self) -> nn.Module | None:
        """Trainable modules besides the model (optimised and checkpointed with it)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this method exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
