"""ResNets from MONAI: any number of input channels, 2-D, without MONAI's classifier.

MONAI's ResNet keeps full resolution in its first convolution by default (stride 1),
which suits tiny patches; from 64 px upwards we use stride 2 like the ImageNet ResNet
so that the cost stays reasonable.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from unshortcut.errors import UnshortcutError

_FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


def _build(name: str, in_channels: int, input_size: int, pretrained: bool) -> tuple[nn.Module, int]:
    if pretrained:
        raise UnshortcutError(
            f"--model {name}: pretrained weights are not offered for MONAI 2-D ResNets "
            "(use timm:<name> with the timm extra installed)"
        )
    from monai.networks import nets

    factory = getattr(nets, name)
    net = factory(
        spatial_dims=2,
        n_input_channels=in_channels,
        conv1_t_stride=2 if input_size >= 64 else 1,
        feed_forward=False,
    )
    return net, _FEATURES[name]


BUILDERS = {name: partial(_build, name) for name in _FEATURES}
