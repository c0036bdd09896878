"""Model registry: ``build_model(name, ...)`` for every backbone family.

Backbone builders return ``(module, feature_dim)``; the registry wraps them in a
:class:`Classifier` with our own linear head, so the head is the same object type
for every architecture (MONAI's and timm's own classifier layers are dropped).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from unshortcut.errors import UnshortcutError

BackboneBuilder = Callable[[int, int, bool | str], tuple[nn.Module, int]]
"""(in_channels, input_size, pretrained) -> (backbone mapping (B, C, S, S) to (B, D), D).

``pretrained``: False, True (default weights) or a checkpoint path / hub name
(:mod:`unshortcut.models.pretrained`)."""


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


class Classifier(nn.Module):
    """``forward(x) = head(features(x))`` with ``features(x) -> (B, D)``."""

    def __init__(self, backbone: nn.Module, n_features: int, n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.n_features = n_features
        self.head = nn.Linear(n_features, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def outputs(self, x: torch.Tensor) -> ModelOutput:
        """Logits and the features they were computed from, in one pass."""
        features = self.features(x)
        return ModelOutput(logits=self.head(features), features=features)

    def forward(self, x: torch.Tensor, outputs: bool = False) -> torch.Tensor | ModelOutput:
        """Logits, or with ``outputs`` the whole :class:`ModelOutput` (the form a data-parallel
        wrapper passes through: ``wrapped(x, outputs=True)``)."""
        out = self.outputs(x)
        return out if outputs else out.logits

    def last_layer(self) -> nn.Linear | None:
        """The linear layer that maps features to logits (DFR refits it), if there is one."""
        return self.head


def _builders() -> dict[str, BackboneBuilder]:
    # Imported lazily so that `import unshortcut.models` does not import MONAI.
    from unshortcut.models import monai_nets, small_cnn

    return {
        "small_cnn": small_cnn.build,
        "small_cnn_gn": small_cnn.build_group_norm,
        **monai_nets.BUILDERS,
    }


def model_names() -> list[str]:
    """Built-in model names; any ``timm:<name>`` works too when timm is installed."""
    return sorted(_builders())


def build_model(
    name: str, in_channels: int, n_classes: int, input_size: int, *, pretrained: bool | str = False
) -> Classifier:
    """A freshly initialised classifier (initialisation uses torch's global RNG)."""
    if in_channels < 1 or n_classes < 2 or input_size < 1:
        raise UnshortcutError(
            f"model {name!r}: needs in_channels >= 1, n_classes >= 2 and input_size >= 1 "
            f"(got {in_channels}, {n_classes}, {input_size})"
        )
    if name.startswith("timm:"):
        from unshortcut.models import timm_nets

        backbone, dim = timm_nets.build(name.removeprefix("timm:"), in_channels, pretrained)
    else:
        builders = _builders()
        if name not in builders:
            known = ", ".join(sorted(builders))
            raise UnshortcutError(f"--model: unknown model {name!r} (known: {known}, timm:<name>)")
        if pretrained and name.startswith("small_cnn"):
            raise UnshortcutError(f"--model {name}: has no pretrained weights")
        backbone, dim = builders[name](in_channels, input_size, pretrained)
    return Classifier(backbone, dim, n_classes)
