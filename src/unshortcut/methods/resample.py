"""Group resampling: every batch spreads its rows evenly over the groups.

The classic group-balanced baseline (GERNE with c = 1 and beta = 0 draws the same
attribute distribution within each class, but keeps the class balance exact).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from unshortcut.methods.base import Method
from unshortcut.methods.registry import register
from unshortcut.methods.sampling import draw_group_uniform, rows_by_group


@register
class GroupResample(Method):
    """Batches drawn uniformly over the non-empty groups, uniformly within each group."""

    name = "resample"
    summary = "group-balanced batches (uniform over groups)"
    needs_train_attributes = True

    def epoch_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        members = rows_by_group(self.ctx.train)
        for _ in range(self.steps_per_epoch()):
            yield draw_group_uniform(rng, members, self.ctx.batch_size)
