"""Group DRO (Sagawa et al., 2020): minimise a softly worst-group loss.

Online mirror ascent on group weights q: after each batch,
``q_g <- q_g exp(eta (L_g + C / sqrt(n_g)))`` for the groups in the batch, renormalised,
and the step is on ``sum_g q_g L_g``. ``C / sqrt(n_g)`` (the generalisation adjustment,
n_g = training rows of group g) favours small groups, whose training loss understates
their test loss. Batches are ERM's shuffled passes.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from unshortcut import distributed
from unshortcut.methods.base import HParam, Method, TrainContext
from unshortcut.methods.registry import register
from unshortcut.rows import Batch


@register
class GroupDRO(Method):
    """Group weights q live on the CPU in float64 and round-trip through ``state_dict``."""

    name = "groupdro"
    summary = "online worst-group loss with exponentiated group weights"
    needs_train_attributes = True
    hparams: ClassVar[dict[str, HParam]] = {
        "eta": HParam(0.01, 0.001, 0.1, log=True, help="step size of the group weights"),
        "C": HParam(0.0, choices=(0.0, 1.0, 2.0, 3.0, 4.0), help="generalisation adjustment"),
    }

    def __init__(self, ctx: TrainContext, **hp: Any) -> None:
        super().__init__(ctx, **hp)
        counts = ctx.train.group_counts().astype(np.float64)
        present = counts > 0
        # Empty groups never appear in a batch; they keep weight 0.
        self.q = torch.as_tensor(present / present.sum())
        adjustment = np.zeros_like(counts)
        adjustment[present] = float(self.hp["C"]) / np.sqrt(counts[present])
        self.adjustment = torch.as_tensor(adjustment)
        self.row_groups = torch.as_tensor(ctx.train.groups, dtype=torch.long)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-group mean losses of the (global) batch; q steps on them, the model on
        sum_g q_g L_g. Under data parallelism the group sums and sizes are summed over
        ranks first, so every rank takes the same q step and the averaged gradient is
        the single-process one."""
        losses = self.per_sample_loss(model, batch)
        groups = self.row_groups[batch.index.cpu()].to(losses.device)
        n_groups = len(self.q)
        sums = torch.zeros(n_groups, device=losses.device).index_add(0, groups, losses)
        sizes = distributed.all_reduce_sum(
            torch.bincount(groups, minlength=n_groups).to(losses.dtype)
        )
        group_loss = distributed.all_reduce_sum(sums.detach().clone()) / sizes.clamp(min=1)
        seen = (sizes > 0).cpu()
        step = float(self.hp["eta"]) * (group_loss.cpu().double() + self.adjustment)
        self.q = torch.where(seen, self.q * torch.exp(step), self.q)
        self.q = self.q / self.q.sum()
        weights = self.q.to(losses.device, losses.dtype) / sizes.clamp(min=1)
        return (weights * sums).sum() * distributed.world()

    def state_dict(self) -> dict[str, Any]:
        return {"q": self.q.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.q = torch.as_tensor(state["q"], dtype=torch.float64).clone()
