"""ResNets from MONAI: any number of input channels, 2-D, without MONAI's classifier.

MONAI's ResNet keeps full resolution in its first convolution by default (stride 1),
which suits tiny patches; from 64 px upwards we use stride 2 like the ImageNet ResNet
so that the cost stays reasonable. Pretrained weights (torchvision/timm-style ResNet
checkpoints or hub names) load onto the same architecture, with or without weights,
so a run's saved weights always fit a freshly built network
(:mod:`unshortcut.models.pretrained`).
"""

from __future__ import annotations

from functools import partial

from torch import nn

from unshortcut.models.pretrained import DEFAULT_HUB_WEIGHTS, load_into, pretrained_state_dict

_FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


def _build(
    name: str, in_channels: int, input_size: int, pretrained: bool | str
) -> tuple[nn.Module, int]:
    from monai.networks import nets

    factory = getattr(nets, name)
    net = factory(
        spatial_dims=2,
        n_input_channels=in_channels,
        conv1_t_stride=2 if input_size >= 64 else 1,
        feed_forward=False,
    )
    if pretrained:
        spec = DEFAULT_HUB_WEIGHTS[name] if pretrained is True else pretrained
        load_into(net, pretrained_state_dict(spec), source=str(spec), model=name)
    return net, _FEATURES[name]


BUILDERS = {name: partial(_build, name) for name in _FEATURES}
