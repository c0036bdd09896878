"""What a model's forward pass gives (its own module: the registry and the decoder share it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelOutput:
    """Everything a forward pass gives; inference and methods read what they need.

    ``logits`` ``(B, K)`` always; ``features`` ``(B, D)``, the penultimate features the
    head reads (DFR refits the head on them, the decodability probe reads them), where
    the model has them; ``backbone_features`` ``(B, D_all)`` everything the backbone
    gives, a superset of ``features`` when the head reads only part of it (MIMM's
    attribute parts); ``pixel_logits`` ``(B, K, S, S)`` for models that predict a map
    (spatial supervision).
    """

    logits: torch.Tensor
    features: torch.Tensor | None = None
    pixel_logits: torch.Tensor | None = None
    backbone_features: torch.Tensor | None = None
