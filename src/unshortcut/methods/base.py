"""The Method interface: how batches are drawn and how a batch trains the model.

The training loop (``unshortcut.train``) owns the model, checkpoints, validation and
selection; a method decides

- which training rows form each batch (``epoch_batches``),
- what one batch does (``train_step``: by default the ``loss``, one backward, one step
  of every optimizer; a method may own extra modules and optimizers, as DomainBed's
  ``Algorithm.update`` does, and report several named loss terms),
- the optimizers (``optimizers``: by default one over the model and ``extra_modules``),
- optional work before training (``prepare``: JTT's error set, GERNE's pseudo-groups),
  after each epoch (``on_epoch_end``; ``stop_reason`` ends training early) and after
  training (``finalize``: DFR's last-layer retraining),
- how the search draws its hyperparameters (``draw_hparams``, ``grid_hparams``).

Methods see the data only through :class:`~unshortcut.rows.GroupedSplit` arrays and the
:class:`TrainContext` services, so adding a method touches one new file and the
registry, nothing else. Everything a method keeps between steps must round-trip
through ``state_dict`` (extra modules and optimizers are checkpointed by the loop) so
that a killed run resumes exactly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from unshortcut import distributed
from unshortcut.errors import UnshortcutError
from unshortcut.rows import Batch, GroupedSplit

Optimizers = dict[str, torch.optim.Optimizer]
"""A method's optimizers by name; "model" steps the model (and, by default, extras)."""


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

    def grid(self, points: int) -> list[Any]:
        """Choices, or ``points`` evenly spaced values (geometric when ``log``) over the range."""
        if self.choices:
            return list(self.choices)
        if self.low is None or self.high is None or points < 2:
            return [self.default]
        if self.log:
            values = np.exp(np.linspace(math.log(self.low), math.log(self.high), points))
        else:
            values = np.linspace(self.low, self.high, points)
        if self.integer:
            return sorted({round(float(v)) for v in values})
        return [float(v) for v in values]


class TrainContext(Protocol):
    """Services the training loop offers to methods."""

    train: GroupedSplit
    val: GroupedSplit
    batch_size: int
    seed: int
    device: torch.device
    pretrained: bool
    """Whether the run's model starts from pretrained weights."""

    def new_model(self) -> nn.Module:
        """A freshly initialised model of the run's architecture."""
        ...

    def make_optimizer(
        self,
        params: Iterable[nn.Parameter],
        lr_factor: float = 1.0,
        weight_decay_factor: float = 1.0,
    ) -> torch.optim.Optimizer:
        """An optimizer of the run's kind and settings, scaled by the factors."""
        ...

    def fit_auxiliary(
        self,
        method: Method,
        *,
        epochs: int,
        lr_factor: float = 1.0,
        weight_decay_factor: float = 1.0,
        select_by: str = "last",
    ) -> nn.Module:
        """Train a fresh model with ``method`` through the loop's own epochs.

        Learning rate and weight decay are the run's, scaled by the factors;
        ``select_by`` is "last" or a validation criterion (e.g. "balanced_accuracy")
        evaluated each epoch. Used by JTT and GERNE (unknown attributes).
        """
        ...

    def predict(self, model: nn.Module, split: str) -> np.ndarray:
        """Class probabilities ``(N, K)`` for every row of ``split`` (no augmentation)."""
        ...

    def features(self, model: nn.Module, split: str) -> np.ndarray:
        """Penultimate features ``(N, D)`` for every row of ``split`` (no augmentation)."""
        ...


def backward_and_step(loss: torch.Tensor, optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Zero the gradients, one backward pass of ``loss``, one step of each optimizer.

    Under data parallelism the model's gradients are averaged by its DDP wrapper during
    backward, the rest (extra modules) here, before the step.
    """
    optimizers = list(optimizers)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    distributed.average_unmanaged_gradients(optimizers)
    for optimizer in optimizers:
        optimizer.step()


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

    @classmethod
    def model_options(cls, hp: dict[str, Any]) -> dict[str, Any]:
        """Keyword options of ``build_model`` this method needs (e.g. a pixel decoder)."""
        return {}

    @classmethod
    def draw_hparams(
        cls, rng_for: Callable[[str], np.random.Generator], train: GroupedSplit | None
    ) -> dict[str, Any]:
        """One random-search draw; ``rng_for(name)`` is that hyperparameter's own stream.

        Default: every hyperparameter independently from its range. Methods whose
        feasible range depends on the data or on another hyperparameter (GERNE's beta)
        override this, so the search never spends trials outside it.
        """
        return {name: h.sample(rng_for(name)) for name, h in cls.hparams.items()}

    @classmethod
    def grid_hparams(cls, points: int, train: GroupedSplit | None) -> list[dict[str, Any]]:
        """The grid search's points: the Cartesian product of every range's grid."""
        names = sorted(cls.hparams)
        axes = [cls.hparams[n].grid(points) for n in names]
        return [dict(zip(names, values, strict=True)) for values in itertools.product(*axes)]

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

    def per_sample_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Loss of every row, ``(B,)``: cross-entropy of the class logits.

        Methods that weight or combine rows (reweighting, GroupDRO, GERNE) build on this,
        so a method that changes what one row costs (spatial supervision) combines with
        them by overriding this alone.
        """
        return F.cross_entropy(model(batch.x), batch.y, reduction="none")

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The scalar ``train_step`` backpropagates; default the mean row loss (over the
        global batch when several ranks train: see ``distributed.global_mean``)."""
        return distributed.global_mean(self.per_sample_loss(model, batch))

    def extra_modules(self) -> nn.Module | None:
        """Trainable modules besides the model (checkpointed with it)."""
        return None

    def optimizers(self, model: nn.Module) -> Optimizers:
        """Default: one optimizer of the run's kind over the model and ``extra_modules``."""
        extra = self.extra_modules()
        params = list(model.parameters()) + ([] if extra is None else list(extra.parameters()))
        return {"model": self.ctx.make_optimizer(params)}

    def train_step(
        self, model: nn.Module, batch: Batch, optimizers: Optimizers
    ) -> dict[str, float]:
        """One batch: ``loss``, one backward, one step of every optimizer.

        Returns the named loss terms of the step (averaged per epoch into history.jsonl);
        "loss" is the objective, which the loop checks for divergence.
        """
        loss = self.loss(model, batch)
        backward_and_step(loss, optimizers.values())
        return {"loss": float(loss.detach())}

    def on_epoch_end(self, epoch: int, model: nn.Module, terms: dict[str, float]) -> None:
        """Per-epoch bookkeeping; ``terms`` are the epoch's mean loss terms."""

    def stop_reason(self) -> str | None:
        """Why training must end now (checked after every epoch), or ``None`` to go on."""
        return None

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

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this method exactly (modules and optimizers aside)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
