"""Learning from Failure (Nam et al., 2020): a deliberately biased twin guides the debiasing.

Two models train side by side on the same batches. The biased one minimises generalized
cross-entropy ``(1 - p_y^q) / q``, which amplifies its reliance on easy (shortcut) cues.
The debiased model weights each row's cross-entropy by its relative difficulty
``W = L_b / (L_b + L_d)``, from per-row exponential moving averages of both losses,
each divided by its class maximum (as in the authors' code): rows the biased model
fails on get weights near 1, rows it finds easy near 0.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from unshortcut import distributed
from unshortcut.methods.base import HParam, Method, TrainContext
from unshortcut.methods.registry import register
from unshortcut.rows import Batch


def generalized_cross_entropy(logits: torch.Tensor, y: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row GCE ``(1 - p_y^q) / q``; its gradient is CE's scaled by ``p_y^q``."""
    p_true = F.softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
    return (1.0 - p_true.clamp_min(1e-8) ** q) / q


class LossEMA:
    """Per-row moving average of a loss; a row's first value is taken as is."""

    def __init__(self, labels: torch.Tensor, n_classes: int, decay: float) -> None:
        self.labels, self.n_classes, self.decay = labels, n_classes, decay
        self.value = torch.zeros(len(labels), dtype=torch.float64)
        self.seen = torch.zeros(len(labels), dtype=torch.bool)

    def update(self, rows: torch.Tensor, loss: torch.Tensor) -> None:
        loss = loss.detach().cpu().double()
        old = torch.where(self.seen[rows], self.value[rows], loss)
        self.value[rows] = self.decay * old + (1.0 - self.decay) * loss
        self.seen[rows] = True

    def normalised(self, rows: torch.Tensor) -> torch.Tensor:
        """EMA of ``rows`` divided by the largest EMA of their class."""
        top = torch.zeros(self.n_classes, dtype=torch.float64)
        top = top.scatter_reduce(0, self.labels, self.value, reduce="amax")
        return self.value[rows] / top[self.labels[rows]].clamp_min(1e-8)


def relative_difficulty(biased: torch.Tensor, debiased: torch.Tensor) -> torch.Tensor:
    """W = L_b / (L_b + L_d): near 1 where the biased model fails."""
    return biased / (biased + debiased + 1e-8)


@register
class LfF(Method):
    """The biased model is an extra module: the loop optimises and checkpoints it."""

    name = "lff"
    summary = "debias by reweighting rows a GCE-trained biased twin gets wrong"
    hparams: ClassVar[dict[str, HParam]] = {
        "q": HParam(0.7, 0.5, 0.9, help="GCE exponent of the biased model"),
        "ema": HParam(0.7, 0.5, 0.95, help="decay of the per-row loss averages"),
    }

    def __init__(self, ctx: TrainContext, **hp: Any) -> None:
        super().__init__(ctx, **hp)
        labels = torch.as_tensor(ctx.train.labels, dtype=torch.long)
        n_classes, decay = ctx.train.n_classes, float(self.hp["ema"])
        self.ema_biased = LossEMA(labels, n_classes, decay)
        self.ema_debiased = LossEMA(labels, n_classes, decay)
        self.biased: nn.Module | None = None
        self.last_weights: torch.Tensor | None = None

    def extra_modules(self) -> nn.Module:
        if self.biased is None:
            self.biased = self.ctx.new_model().to(self.ctx.device)
        return self.biased

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        ce = self.per_sample_loss(model, batch)
        logits_biased = self.extra_modules()(batch.x)
        ce_biased = F.cross_entropy(logits_biased, batch.y, reduction="none")
        rows = batch.index.cpu()
        # Every rank updates the averages with every rank's rows, so they agree.
        shares = distributed.gather_objects((rows, ce_biased.detach().cpu(), ce.detach().cpu()))
        for share_rows, share_biased, share_debiased in shares:
            self.ema_biased.update(share_rows, share_biased)
            self.ema_debiased.update(share_rows, share_debiased)
        weights = relative_difficulty(
            self.ema_biased.normalised(rows), self.ema_debiased.normalised(rows)
        ).to(ce.device, ce.dtype)
        self.last_weights = weights
        gce = generalized_cross_entropy(logits_biased, batch.y, float(self.hp["q"]))
        return distributed.global_mean(gce) + distributed.global_mean(weights * ce)

    def state_dict(self) -> dict[str, Any]:
        return {
            name: {"value": ema.value.clone(), "seen": ema.seen.clone()}
            for name, ema in (("biased", self.ema_biased), ("debiased", self.ema_debiased))
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, ema in (("biased", self.ema_biased), ("debiased", self.ema_debiased)):
            ema.value = state[name]["value"].clone()
            ema.seen = state[name]["seen"].clone()
