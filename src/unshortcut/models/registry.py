"""Model registry: ``build_model(name, ...)`` for every backbone family.

Backbone builders return ``(module, feature_dim)``; the registry wraps them in a
:class:`Classifier` with our own linear head, so the head is the same object type
for every architecture (MONAI's and timm's own classifier layers are dropped).
With ``decoder=True`` the same backbone feeds a pixel decoder instead
(:class:`~unshortcut.models.decoder.SpatialClassifier`): the patch score then comes
from the aggregated pixel map.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from unshortcut.errors import UnshortcutError
from unshortcut.models.output import ModelOutput

BackboneBuilder = Callable[[int, int, bool | str], tuple[nn.Module, int]]
"""(in_channels, input_size, pretrained) -> (backbone mapping (B, C, S, S) to (B, D), D).

``pretrained``: False, True (default weights) or a checkpoint path / hub name
(:mod:`unshortcut.models.pretrained`)."""


class Classifier(nn.Module):
    """``forward(x) = head(features(x)[:, :head_features])`` with ``features(x) -> (B, D)``.

    The head reads the first ``head_features`` of the ``D`` backbone features (all of
    them by default); a method that reserves the others for heads of its own (MIMM's
    per-attribute parts) asks for a smaller share, so the class prediction provably
    depends on the task part only.
    """

    def __init__(
        self, backbone: nn.Module, n_features: int, n_classes: int, head_features: int | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.n_features = n_features
        self.head_features = n_features if head_features is None else head_features
        if not 1 <= self.head_features <= n_features:
            raise ValueError(f"head_features {head_features} outside 1..{n_features}")
        self.head = nn.Linear(self.head_features, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """All ``D`` backbone features."""
        return self.backbone(x)

    def outputs(self, x: torch.Tensor) -> ModelOutput:
        """Logits, the features the head read and all backbone features, in one pass."""
        everything = self.features(x)
        features = everything[:, : self.head_features]
        return ModelOutput(
            logits=self.head(features), features=features, backbone_features=everything
        )

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
    name: str,
    in_channels: int,
    n_classes: int,
    input_size: int,
    *,
    pretrained: bool | str = False,
    decoder: bool = False,
    aggregation: str = "max",
    top_k: float = 0.05,
    head_share: float | None = None,
) -> nn.Module:
    """A freshly initialised classifier (initialisation uses torch's global RNG).

    ``decoder``: a pixel-map model on the same backbone, whose patch tumor probability
    aggregates its pixel probabilities by ``aggregation`` (``max``, ``topk`` over the
    ``top_k`` share of pixels, ``mean``); two classes only (tumor vs not).
    ``head_share`` (a method's model option): the head reads only the first
    ``round(head_share * D)`` backbone features, at least one and at most ``D - 1``.
    """
    if in_channels < 1 or n_classes < 2 or input_size < 1:
        raise UnshortcutError(
            f"model {name!r}: needs in_channels >= 1, n_classes >= 2 and input_size >= 1 "
            f"(got {in_channels}, {n_classes}, {input_size})"
        )
    if decoder and n_classes != 2:
        raise UnshortcutError(
            f"model {name!r}: a pixel decoder predicts tumor vs not, so it needs 2 classes "
            f"(got {n_classes})"
        )
    if name.startswith("timm:"):
        from unshortcut.models import timm_nets

        backbone, dim = timm_nets.build(
            name.removeprefix("timm:"), in_channels, pretrained, features_only=decoder
        )
    else:
        builders = _builders()
        if name not in builders:
            known = ", ".join(sorted(builders))
            raise UnshortcutError(f"--model: unknown model {name!r} (known: {known}, timm:<name>)")
        if pretrained and name.startswith("small_cnn"):
            raise UnshortcutError(f"--model {name}: has no pretrained weights")
        backbone, dim = builders[name](in_channels, input_size, pretrained)
    if not decoder:
        if head_share is None:
            return Classifier(backbone, dim, n_classes)
        if not 0.0 < head_share < 1.0:
            raise UnshortcutError(f"model {name!r}: head_share {head_share} must lie in (0, 1)")
        return Classifier(backbone, dim, n_classes, min(max(round(head_share * dim), 1), dim - 1))
    if head_share is not None:
        raise UnshortcutError(f"model {name!r}: a pixel decoder and head_share exclude each other")
    from unshortcut.models.decoder import ListStages, SequentialStages, SpatialClassifier

    encoder = ListStages(backbone) if name.startswith("timm:") else SequentialStages(backbone)
    return SpatialClassifier(encoder, in_channels, input_size, aggregation, top_k)
