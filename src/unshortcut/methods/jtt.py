"""Just Train Twice (Liu et al., 2021): upsample what a short ERM run gets wrong.

Needs no attributes: an identification model trained for T epochs marks the training
rows it misclassifies (the error set); the final model then trains on an epoch in which
every error-set row appears ``lambda_up`` times and every other row once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch

from unshortcut.errors import UnshortcutError
from unshortcut.methods.base import HParam, Method, TrainContext
from unshortcut.methods.registry import get_method, register
from unshortcut.rows import GroupedSplit


def upsampled_rows(n_rows: int, error_set: np.ndarray, lambda_up: int) -> np.ndarray:
    """All rows once plus the error set ``lambda_up - 1`` more times (unshuffled)."""
    return np.concatenate([np.arange(n_rows), np.tile(error_set, lambda_up - 1)])


@register
class JTT(Method):
    """Identification in ``prepare``; upsampled shuffled passes afterwards."""

    name = "jtt"
    summary = "upsample the rows a short ERM run misclassifies"
    hparams: ClassVar[dict[str, HParam]] = {
        "epochs": HParam(1, 1, 5, integer=True, help="epochs T of the identification model"),
        "lambda_up": HParam(6, 2, 50, log=True, integer=True, help="copies of each error row"),
    }

    def __init__(self, ctx: TrainContext, **hp: Any) -> None:
        self.error_set: np.ndarray | None = None
        super().__init__(ctx, **hp)

    @classmethod
    def check_hparams(cls, hp: dict[str, Any], train: GroupedSplit) -> None:
        if int(hp["lambda_up"]) < 1 or int(hp["epochs"]) < 1:
            raise UnshortcutError(
                f"method 'jtt': lambda_up={hp['lambda_up']} and epochs={hp['epochs']} "
                "must be at least 1"
            )

    def prepare(self) -> None:
        model = self.ctx.fit_auxiliary(get_method("erm")(self.ctx), epochs=int(self.hp["epochs"]))
        predicted = self.ctx.predict(model, "train").argmax(axis=1)
        errors = np.flatnonzero(predicted != self.ctx.train.labels)
        if len(errors) == 0:
            raise UnshortcutError(
                f"method 'jtt': the identification model (epochs={self.hp['epochs']}) "
                "classifies every training row correctly, so the error set is empty; "
                "lower 'epochs' or use another method"
            )
        self.error_set = errors

    def _rows(self) -> np.ndarray:
        if self.error_set is None:
            raise RuntimeError("jtt: prepare() must run before sampling")
        return upsampled_rows(len(self.ctx.train), self.error_set, int(self.hp["lambda_up"]))

    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self._rows()) / self.ctx.batch_size))

    def epoch_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        order = rng.permutation(self._rows())
        size = self.ctx.batch_size
        for start in range(0, len(order), size):
            yield order[start : start + size]

    def state_dict(self) -> dict[str, Any]:
        errors = None if self.error_set is None else torch.from_numpy(self.error_set)
        return {"error_set": errors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        errors = state["error_set"]
        self.error_set = None if errors is None else np.asarray(errors, dtype=np.int64)
