"""Hyperparameter search over a method's HParam ranges, and validation-only selection.

Trials are reproducible one hyperparameter at a time, as in DomainBed's hparams
registry: the value of hyperparameter ``h`` in trial ``i`` of method ``m`` comes from a
generator seeded by a stable hash of ``(m, i, base_seed, h)``. Adding trials, or a new
hyperparameter to a method, leaves every other drawn value unchanged. Trial 0 holds the
defaults.

Every trial also draws the training hyperparameters shared by all methods
(``TRAINING_HPARAMS``: learning rate and weight decay), so methods without
hyperparameters of their own (ERM, resampling, ...) are tuned with the same budget
as the others instead of repeating one configuration.

Selection follows the 2 x 2 protocol (training attributes known or not, validation
attributes known or not): with validation attributes the criterion is
worst_group_accuracy, without them worst_class_accuracy; methods that read training
(or validation) attributes are only eligible where those are known. Test values are
dropped as soon as a metrics file is read, so they cannot influence any choice.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unshortcut.errors import UnshortcutError
from unshortcut.methods import GroupedSplit, HParam, get_method
from unshortcut.sealed import read_sealed

MAX_REDRAWS = 100

TRAINING_HPARAMS: dict[str, HParam] = {
    "lr": HParam(0.01, 1e-3, 5e-2, log=True, help="learning rate"),
    "weight_decay": HParam(1e-4, 1e-6, 1e-2, log=True, help="weight decay"),
}
"""Training settings searched for every method; defaults equal TrainConfig's."""


def stable_seed(*parts: Any) -> int:
    """A 31-bit seed from the text of ``parts`` (md5: identical across runs and machines)."""
    digest = hashlib.md5(repr(parts).encode("utf-8")).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


def trial_seed(method: str, trial: int, base_seed: int = 0) -> int:
    """The seed of trial ``trial`` of ``method`` (what the run's ``--seed`` becomes)."""
    return stable_seed(method, trial, base_seed)


@dataclass(frozen=True)
class Trial:
    """One configuration to run: a method, its hyperparameters and the run's seed."""

    method: str
    index: int
    seed: int
    hparams: dict[str, Any] = field(hash=False)
    training: dict[str, Any] = field(
        hash=False, default_factory=lambda: {k: h.default for k, h in TRAINING_HPARAMS.items()}
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "index": self.index,
            "seed": self.seed,
            "hparams": dict(self.hparams),
            "training": dict(self.training),
        }


def _draw(
    method: str, trial: int, base_seed: int, attempt: int, train: GroupedSplit | None
) -> dict[str, Any]:
    cls = get_method(method)
    if trial == 0 and attempt == 0:
        return {name: h.default for name, h in cls.hparams.items()}
    return cls.draw_hparams(
        lambda name: np.random.default_rng(stable_seed(method, trial, base_seed, name, attempt)),
        train,
    )


def _draw_training(method: str, trial: int, base_seed: int) -> dict[str, Any]:
    if trial == 0:
        return {name: h.default for name, h in TRAINING_HPARAMS.items()}
    return {
        name: h.sample(np.random.default_rng(stable_seed(method, trial, base_seed, name, 0)))
        for name, h in TRAINING_HPARAMS.items()
    }


def _feasible(method: str, hp: dict[str, Any], train: GroupedSplit | None) -> bool:
    if train is None:
        return True
    try:
        get_method(method).check_hparams(hp, train)
    except UnshortcutError:
        return False
    return True


def random_trials(
    method: str, n_trials: int, base_seed: int = 0, train: GroupedSplit | None = None
) -> list[Trial]:
    """``n_trials`` random configurations (trial 0: the defaults).

    With ``train`` given, draws the method refuses for that data (GERNE's beta above
    beta_max) are redrawn from the next attempt's seeds, still deterministically.
    """
    trials = []
    for index in range(n_trials):
        for attempt in range(MAX_REDRAWS):
            hp = _draw(method, index, base_seed, attempt, train)
            if _feasible(method, hp, train):
                break
        else:
            raise UnshortcutError(
                f"search: no feasible hyperparameters for {method!r} in {MAX_REDRAWS} draws "
                "on this training data"
            )
        training = _draw_training(method, index, base_seed)
        trials.append(Trial(method, index, trial_seed(method, index, base_seed), hp, training))
    return trials


def grid_trials(
    method: str, points: int = 3, base_seed: int = 0, train: GroupedSplit | None = None
) -> list[Trial]:
    """The method's grid (``Method.grid_hparams``), infeasible points dropped."""
    trials: list[Trial] = []
    for hp in get_method(method).grid_hparams(points, train):
        if _feasible(method, hp, train):
            index = len(trials)
            trials.append(Trial(method, index, trial_seed(method, index, base_seed), hp))
    return trials


# ----------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Protocol:
    """Which attributes a setting may use: in training, and in validation (selection)."""

    train_attributes: bool
    val_attributes: bool

    @property
    def name(self) -> str:
        known = {True: "known", False: "unknown"}
        return f"train-{known[self.train_attributes]}/val-{known[self.val_attributes]}"

    @property
    def criterion(self) -> str:
        return "worst_group_accuracy" if self.val_attributes else "worst_class_accuracy"

    def allows(self, method: str, hparams: dict[str, Any]) -> bool:
        cls = get_method(method)
        if cls.needs_train_attributes and not self.train_attributes:
            return False
        return self.val_attributes or not cls.uses_val_attributes(hparams)


PROTOCOLS: tuple[Protocol, ...] = tuple(
    Protocol(t, v) for t, v in itertools.product((True, False), repeat=2)
)


@dataclass(frozen=True)
class RunSummary:
    """What selection may see of one finished run: never its test values."""

    path: Path
    method: str
    hparams: dict[str, Any]
    val_scores: dict[str, float]


def _method_of(config: dict[str, Any], path: Path) -> tuple[str, dict[str, Any]]:
    """The method name and its resolved hyperparameters (``config.json``'s method, hp)."""
    method = config.get("method")
    if not isinstance(method, str):
        raise UnshortcutError(f"{path / 'config.json'}: names no method")
    return method, dict(config.get("hp") or {})


def read_run(run: Path) -> RunSummary:
    """Validation score per criterion (at the checkpoint that criterion selected).

    ``metrics.json`` holds ``by_criterion: {criterion: {"val": {...}, "test": {...}}}``;
    every ``test`` entry is discarded here, before anything looks at the values.
    """
    run = Path(run)
    for name in ("config.json", "metrics.json"):
        if not (run / name).is_file():
            raise UnshortcutError(f"{run}: not a finished run (no {name})")
    config, metrics = (read_sealed(run / name) for name in ("config.json", "metrics.json"))
    if not isinstance(config, dict) or not isinstance(metrics, dict):
        raise UnshortcutError(f"{run}: not a finished run (config.json or metrics.json)")
    by_criterion = metrics.get("by_criterion")
    if not isinstance(by_criterion, dict):
        raise UnshortcutError(f"{run / 'metrics.json'}: has no 'by_criterion' section")
    scores = {}
    for criterion, entry in by_criterion.items():
        value = (entry.get("val") or {}).get(criterion)
        if isinstance(value, int | float) and math.isfinite(value):
            scores[criterion] = float(value)
    method, hparams = _method_of(config, run)
    return RunSummary(run, method, hparams, scores)


def select_best(runs: list[Path]) -> dict[str, dict[str, RunSummary]]:
    """``{protocol name: {method: best run}}`` by the protocol's validation criterion.

    Ties go to the first run in ``runs`` order; runs without that criterion's
    validation score are skipped.
    """
    summaries = [read_run(run) for run in runs]
    best: dict[str, dict[str, RunSummary]] = {}
    for protocol in PROTOCOLS:
        chosen: dict[str, RunSummary] = {}
        for summary in summaries:
            score = summary.val_scores.get(protocol.criterion)
            if score is None or not protocol.allows(summary.method, summary.hparams):
                continue
            current = chosen.get(summary.method)
            if current is None or score > current.val_scores[protocol.criterion]:
                chosen[summary.method] = summary
        best[protocol.name] = chosen
    return best
