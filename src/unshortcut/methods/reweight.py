"""Group reweighting: shuffled batches, per-sample loss weights against group frequency."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from unshortcut.distributed import global_mean
from unshortcut.methods.base import Method, TrainContext
from unshortcut.methods.registry import register
from unshortcut.rows import Batch


def group_weights(group_counts: np.ndarray) -> np.ndarray:
    """Weight per group, inversely proportional to its size and normalised so that the
    mean weight over the training rows is 1 (the loss keeps ERM's scale); every
    non-empty group then carries the same total weight. Empty groups get 0."""
    counts = np.asarray(group_counts, dtype=float)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


@register
class GroupReweight(Method):
    """Mean of ``w_g * loss`` over a shuffled batch: an unbiased estimate of the
    group-balanced loss, with ERM's batches (no row is repeated within an epoch)."""

    name = "reweight"
    summary = "shuffled batches, loss weights inversely proportional to group frequency"
    needs_train_attributes = True

    def __init__(self, ctx: TrainContext, **hp: Any) -> None:
        super().__init__(ctx, **hp)
        per_group = group_weights(ctx.train.group_counts())
        self.row_weights = torch.as_tensor(per_group[ctx.train.groups], dtype=torch.float32)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        losses = self.per_sample_loss(model, batch)
        return global_mean(self.row_weights[batch.index.cpu()].to(losses.device) * losses)
