"""Spatial supervision: train a pixel tumor map from the patch's mask or box, not its label.

Saab et al. (MLHC 2022, "Reducing reliance on spurious features in medical image
classification with spatial specificity"): the finer the spatial annotation a model is
trained with, the less it can lean on spurious pixels. Here the run's backbone gets a
pixel decoder (``model_options``: ``build_model(..., decoder=True)``), and a row costs

    Dice(p, t) + BCE(p, t) + label_weight * CE(patch score, label)

with ``p`` the pixel tumor probabilities, ``t`` the target map (``spatial-mask``: the
patch's tumor fraction per input pixel, ``Batch.mask``; ``spatial-box``: the filled
bounding box of its tumor pixels) and the patch score the aggregated map
(``aggregation``: ``topk`` by default, see docs/methods/spatial-mask.md for the
evidence). Both map terms are per row, so the loss is a ``per_sample_loss`` and the
spatial loss mixes into any method that weights or combines rows:
``spatial-mask+gerne`` steps GERNE's ``L_lb + beta (L_lb - L_b)`` on spatial row losses
of its two batches, ``spatial-mask+reweight`` weights spatial row losses by group.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from monai.losses import DiceLoss
from torch import nn
from torch.nn import functional as F

from unshortcut.errors import UnshortcutError
from unshortcut.methods.base import HParam, Method
from unshortcut.methods.gerne import GERNE
from unshortcut.methods.registry import register
from unshortcut.methods.reweight import GroupReweight
from unshortcut.models.decoder import AGGREGATIONS
from unshortcut.rows import Batch, GroupedSplit

SPATIAL_HPARAMS: dict[str, HParam] = {
    "aggregation": HParam("topk", help="pixel map to patch score: max, topk or mean"),
    "top_k": HParam(0.05, help="share of pixels the topk aggregation averages"),
    "label_weight": HParam(
        1.0, 0.0, 2.0, help="weight of the patch label's cross-entropy on the aggregated score"
    ),
}

# Laplace smoothing: a patch without tumor costs sum(p) / (sum(p) + 1), so the empty
# masks of non-tumor patches push the predicted tumor area to zero instead of being
# undefined, and a tiny tumor is not all-or-nothing.
_dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=1.0, smooth_dr=1.0)


def box_masks(masks: torch.Tensor) -> torch.Tensor:
    """The filled bounding box of each mask's tumor pixels (value > 0), ``(B, H, W)`` 0/1.

    One box per patch, however many blobs it holds; an empty mask gives an empty box.
    A symmetry of the square maps a box to the box of the transformed mask, so boxes are
    built from the augmented masks.
    """
    tumor = masks > 0

    def filled(occupied: torch.Tensor) -> torch.Tensor:
        """Every index between the first and the last occupied one, ``(B, L)``."""
        seen_before = occupied.cummax(dim=1).values
        seen_after = occupied.flip(1).cummax(dim=1).values.flip(1)
        return seen_before & seen_after

    rows = filled(tumor.any(dim=2))
    cols = filled(tumor.any(dim=1))
    return (rows[:, :, None] & cols[:, None, :]).to(masks.dtype)


def spatial_row_loss(
    pixel_logits: torch.Tensor,
    target: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_weight: float,
) -> torch.Tensor:
    """Dice + binary cross-entropy of the tumor map against ``target`` ``(B, H, W)`` in
    [0, 1], plus ``label_weight`` times the patch cross-entropy, per row ``(B,)``."""
    tumor = pixel_logits[:, 1] - pixel_logits[:, 0]
    bce = F.binary_cross_entropy_with_logits(tumor, target, reduction="none").mean(dim=(1, 2))
    dice = _dice(tumor[:, None], target[:, None]).flatten()
    loss = dice + bce
    if label_weight:
        loss = loss + label_weight * F.cross_entropy(logits, labels, reduction="none")
    return loss


class SpatialSupervision(Method):
    """The spatial row loss and the pixel-decoder model; mixed into registered methods."""

    supervision: ClassVar[str] = "mask"
    """``mask``: the tumor fraction map; ``box``: its filled bounding box."""
    hparams: ClassVar[dict[str, HParam]] = SPATIAL_HPARAMS

    @classmethod
    def check_hparams(cls, hp: dict[str, Any], train: GroupedSplit) -> None:
        super().check_hparams(hp, train)
        if hp["aggregation"] not in AGGREGATIONS:
            raise UnshortcutError(
                f"method {cls.name!r}: aggregation={hp['aggregation']!r} is not one of "
                f"{AGGREGATIONS}"
            )
        if not 0.0 < float(hp["top_k"]) <= 1.0:
            raise UnshortcutError(f"method {cls.name!r}: top_k={hp['top_k']} must lie in (0, 1]")
        if float(hp["label_weight"]) < 0.0:
            raise UnshortcutError(
                f"method {cls.name!r}: label_weight={hp['label_weight']} must be >= 0"
            )
        if train.n_classes != 2:
            raise UnshortcutError(
                f"method {cls.name!r}: the pixel map is tumor vs not, so it needs 2 classes"
            )

    @classmethod
    def model_options(cls, hp: dict[str, Any]) -> dict[str, Any]:
        return {
            "decoder": True,
            "aggregation": hp["aggregation"],
            "top_k": float(hp["top_k"]),
        }

    def target(self, masks: torch.Tensor) -> torch.Tensor:
        return box_masks(masks) if self.supervision == "box" else masks

    def per_sample_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        if batch.mask is None:
            raise UnshortcutError(
                f"method {self.name!r}: the patch set stores no tumor masks (masks.npy); "
                "patchify it again from images with masks"
            )
        out = model.outputs(batch.x)
        if out.pixel_logits is None:
            raise RuntimeError(f"method {self.name!r}: the model predicts no pixel map")
        return spatial_row_loss(
            out.pixel_logits,
            self.target(batch.mask),
            out.logits,
            batch.y,
            float(self.hp["label_weight"]),
        )


@register
class SpatialMask(SpatialSupervision):
    """Pixel-mask supervision (Saab et al.'s segmentation masks)."""

    name = "spatial-mask"
    summary = "pixel decoder trained on the tumor masks (Dice + BCE), patch score from the map"


@register
class SpatialBox(SpatialSupervision):
    """Box supervision: the filled bounding box of the patch's tumor pixels."""

    name = "spatial-box"
    summary = "pixel decoder trained on the filled bounding box of the tumor pixels"
    supervision = "box"


@register
class SpatialMaskGERNE(SpatialSupervision, GERNE):
    """GERNE's batches and extrapolated update on spatial row losses."""

    name = "spatial-mask+gerne"
    summary = "GERNE's biased/less-biased batches and update, on the spatial mask loss"
    hparams: ClassVar[dict[str, HParam]] = {**GERNE.hparams, **SPATIAL_HPARAMS}


@register
class SpatialMaskReweight(SpatialSupervision, GroupReweight):
    """Group reweighting of spatial row losses."""

    name = "spatial-mask+reweight"
    summary = "shuffled batches, spatial mask loss weighted against group frequency"
