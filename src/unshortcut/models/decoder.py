"""Pixel-map models: a U-Net style decoder on a backbone's stages, the patch score from the map.

Spatial supervision (Saab et al., MLHC 2022) trains a model to say *where* the tumor is,
so that it cannot lean on pixels outside it. The model here keeps the run's backbone
(same architecture, same cost of the encoder) and adds a light decoder:

- the **stages** are the backbone's last feature map at each resolution, read off one
  forward pass through its layers in order (``SequentialStages``; small_cnn and the
  MONAI ResNets) or from timm's ``features_only`` models;
- the **decoder** climbs back from the deepest stage: nearest-neighbour upsampling to
  the next stage's size, concatenation with that stage (the skip connection), one
  conv-norm-ReLU of half the stage's width (BatchNorm, or GroupNorm where the backbone
  has no BatchNorm: a batch-independent backbone such as ``small_cnn_gn`` keeps the
  whole model batch-independent, so data-parallel ranks equal one process); a 1x1
  convolution gives one tumor log-odds per pixel at half the input resolution
  (``OUTPUT_STRIDE``), upsampled to the input size. Stages finer than that are not
  decoded: on a CPU the full-resolution level made a small_cnn step 1.6x slower (111 vs
  71 ms at 32 px, batch 64; plain ERM 45 ms).
  Nearest upsampling keeps the backward pass deterministic on GPUs (bilinear's is not);
- the **patch score** aggregates the pixel probabilities (``aggregate_logit``): the
  patch's tumor logit is the logit of the aggregated probability, so the class logits
  ``[0, logit(p)]`` give exactly ``p`` under softmax, and inference, metrics and every
  method read them unchanged.

The map is fully convolutional: a larger input (a whole image tile) gives a map of its
own size, which is what whole-image prediction needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from unshortcut.errors import UnshortcutError
from unshortcut.models.output import ModelOutput

AGGREGATIONS: tuple[str, ...] = ("max", "topk", "mean")
"""How pixel probabilities become the patch's tumor probability."""
DECODER_WIDTH_CAP = 64
"""Widest decoder block: keeps the decoder light next to deep backbones (ResNet-50)."""
OUTPUT_STRIDE = 2
"""The map is predicted at 1/OUTPUT_STRIDE of the input resolution, then upsampled."""
NORM_GROUPS = 8
"""GroupNorm groups of a decoder block (fewer where the width is not a multiple)."""


def aggregate_logit(pixel_logit: torch.Tensor, aggregation: str, top_k: float) -> torch.Tensor:
    """The patch tumor logit ``logit(p)`` from per-pixel tumor logits ``(B, H, W)``, ``(B,)``.

    ``max``: p is the largest pixel probability (the label's own rule: any tumor pixel);
    ``mean``: the mean pixel probability (Saab et al.'s choice, which reads as the tumor
    share of the patch); ``topk``: the mean of the ``ceil(top_k * H * W)`` largest.
    Means are taken in log space, ``logit(mean sigmoid(z)) = logsumexp(logsigmoid(z)) -
    logsumexp(logsigmoid(-z))``, so no probability is ever clamped.
    """
    flat = pixel_logit.flatten(1)
    if aggregation == "max":
        return flat.amax(dim=1)
    if aggregation == "topk":
        k = max(1, math.ceil(top_k * flat.shape[1]))
        flat = flat.topk(min(k, flat.shape[1]), dim=1).values
    elif aggregation != "mean":
        raise UnshortcutError(f"aggregation={aggregation!r} is not one of {AGGREGATIONS}")
    return torch.logsumexp(F.logsigmoid(flat), dim=1) - torch.logsumexp(F.logsigmoid(-flat), dim=1)


class SequentialStages(nn.Module):
    """A backbone's layers applied in order up to its global pooling, keeping the last
    feature map of each resolution (finest first).

    Valid for backbones whose forward is their children in order (small_cnn, MONAI's
    ResNets; tests check the pooled deepest stage equals the backbone's own features).
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        layers = []
        for layer in backbone.children():
            if isinstance(layer, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d | nn.Flatten):
                break
            layers.append(layer)
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stages: list[torch.Tensor] = []
        for layer in self.layers:
            x = layer(x)
            if stages and stages[-1].shape[-2:] == x.shape[-2:]:
                stages[-1] = x
            else:
                stages.append(x)
        return stages


class ListStages(nn.Module):
    """A network that already returns its stage maps (timm ``features_only``), finest first."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.net(x))


Norm = Callable[[int], nn.Module]
"""A normalisation layer for a given channel count."""


def group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(math.gcd(NORM_GROUPS, channels), channels)


def _conv_block(in_channels: int, out_channels: int, norm: Norm) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        norm(out_channels),
        nn.ReLU(inplace=True),
    )


class UNetDecoder(nn.Module):
    """From stage maps (finest first, ``channels`` each) to one tumor logit per pixel."""

    def __init__(self, channels: list[int], norm: Norm = nn.BatchNorm2d) -> None:
        super().__init__()
        widths = [max(8, min(c // 2, DECODER_WIDTH_CAP)) for c in channels]
        below = channels[-1]
        blocks = []
        for level in range(len(channels) - 2, -1, -1):
            blocks.append(_conv_block(below + channels[level], widths[level], norm))
            below = widths[level]
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Conv2d(below, 1, 1)

    def forward(self, stages: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """``(B, H, W)`` tumor logits at ``size`` (the input's height and width)."""
        y = stages[-1]
        for block, skip in zip(self.blocks, reversed(stages[:-1]), strict=True):
            y = F.interpolate(y, size=skip.shape[-2:], mode="nearest")
            y = block(torch.cat([y, skip], dim=1))
        logit = self.out(y)
        if logit.shape[-2:] != size:
            logit = F.interpolate(logit, size=size, mode="nearest")
        return logit[:, 0]


class SpatialClassifier(nn.Module):
    """Encoder stages -> pixel tumor logits -> aggregated patch logits ``[0, logit(p)]``.

    Interface of :class:`~unshortcut.models.registry.Classifier`: ``outputs(x)`` gives
    logits, features (the deepest stage, average-pooled) and ``pixel_logits`` ``(B, 2,
    H, W)`` (``[0, z]``: softmax over classes is the pixel's tumor probability);
    ``last_layer()`` is ``None``: the logits come from the map, not from a linear head
    that DFR could refit.
    """

    def __init__(
        self,
        encoder: nn.Module,
        in_channels: int,
        input_size: int,
        aggregation: str,
        top_k: float,
    ) -> None:
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise UnshortcutError(f"aggregation={aggregation!r} is not one of {AGGREGATIONS}")
        if not 0.0 < top_k <= 1.0:
            raise UnshortcutError(f"top_k={top_k} must lie in (0, 1]")
        self.encoder = encoder
        self.aggregation = aggregation
        self.top_k = top_k
        shapes = self._stage_shapes(in_channels, input_size)
        # Stages finer than the output stride are not decoded (the last one always is).
        fine = [size * OUTPUT_STRIDE > input_size for _, size in shapes[:-1]]
        self.first_decoded = sum(fine)
        self.n_features = shapes[-1][0]
        batch_free = not any(isinstance(m, _BatchNorm) for m in encoder.modules())
        self.decoder = UNetDecoder(
            [c for c, _ in shapes[self.first_decoded :]],
            group_norm if batch_free else nn.BatchNorm2d,
        )

    def _stage_shapes(self, in_channels: int, input_size: int) -> list[tuple[int, int]]:
        """(channels, side) of each stage, from one dry run (eval mode: statistics untouched)."""
        was_training = self.encoder.training
        self.encoder.eval()
        with torch.no_grad():
            stages = self.encoder(torch.zeros(1, in_channels, input_size, input_size))
        self.encoder.train(was_training)
        return [(int(s.shape[1]), int(s.shape[-1])) for s in stages]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[-1].mean(dim=(2, 3))

    def outputs(self, x: torch.Tensor) -> ModelOutput:
        stages = self.encoder(x)
        pixel = self.decoder(stages[self.first_decoded :], (x.shape[-2], x.shape[-1]))
        patch = aggregate_logit(pixel, self.aggregation, self.top_k)
        return ModelOutput(
            logits=torch.stack([torch.zeros_like(patch), patch], dim=1),
            features=stages[-1].mean(dim=(2, 3)),
            pixel_logits=torch.stack([torch.zeros_like(pixel), pixel], dim=1),
        )

    def forward(self, x: torch.Tensor, outputs: bool = False) -> torch.Tensor | ModelOutput:
        """Logits, or with ``outputs`` the whole :class:`ModelOutput` (as
        :meth:`Classifier.forward <unshortcut.models.registry.Classifier.forward>`: the
        form a data-parallel wrapper passes through)."""
        out = self.outputs(x)
        return out if outputs else out.logits

    def last_layer(self) -> nn.Linear | None:
        return None
