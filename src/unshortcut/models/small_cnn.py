"""The default model: a small, fast CNN that trains at useful speed on a CPU.

Four conv-norm-ReLU blocks (16-32-64-128 channels: narrow where the maps are large,
which is where a CPU spends its time), each halving the resolution (only while the map is larger
than 4 px, so 16 px inputs still work), then global average pooling: the feature
size does not depend on the input size.

``small_cnn`` normalises with BatchNorm; ``small_cnn_gn`` with GroupNorm (8 groups),
which does not depend on the batch: data-parallel training then equals single-process
training of the same global batch exactly (BatchNorm would see each rank's share, and
PyTorch synchronises BatchNorm on GPUs only), and tiny batches are safe.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

WIDTHS: tuple[int, ...] = (16, 32, 64, 128)
GROUPS = 8


def build(
    in_channels: int,
    input_size: int,
    pretrained: bool | str,
    norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    channels, size = in_channels, input_size
    for width in WIDTHS:
        layers += [
            nn.Conv2d(channels, width, 3, padding=1, bias=False),
            norm(width),
            nn.ReLU(inplace=True),
        ]
        if size > 4:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), channels


build_group_norm = partial(build, norm=lambda width: nn.GroupNorm(GROUPS, width))
