"""ERM and class-balanced ERM: the baselines every debiasing method is measured against."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from unshortcut.methods.base import Method
from unshortcut.methods.registry import register
from unshortcut.methods.sampling import draw_class_conditional, rows_by_group


@register
class ERM(Method):
    """Empirical risk minimisation: shuffled passes over the training rows."""

    name = "erm"
    summary = "plain training on shuffled batches"


@register
class ClassBalancedERM(Method):
    """Each batch holds the same number of rows of every class, drawn uniformly within it.

    Within a class the attribute keeps its training distribution p(a|y), so this is
    GERNE with beta = -1.
    """

    name = "cb_erm"
    summary = "class-balanced batches, attribute distribution untouched"

    def epoch_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        train = self.ctx.train
        members = rows_by_group(train)
        alpha = train.attribute_given_class()
        per_class = max(1, self.ctx.batch_size // train.n_classes)
        for _ in range(self.steps_per_epoch()):
            yield draw_class_conditional(rng, members, train.n_attributes, per_class, alpha)
