"""What a model's forward pass gives (its own module: the registry and the decoder share it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelOutput:
    """Everything a forward pass gives; inference and methods read what they need.

    ``logits`` ``(B, K)`` always; ``features`` ``(B, D)`` where the model has a
    penultimate layer (DFR, probes); ``pixel_logits`` ``(B, K, S, S)`` for models that
    predict a map (spatial supervision).
    """

    logits: torch.Tensor
    features: torch.Tensor | None = None
    pixel_logits: torch.Tensor | None = None
