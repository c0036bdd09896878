"""Backbones from timm (optional extra ``unshortcut[timm]``).

``pretrained`` is ``True`` (the model's default weights), a checkpoint file or a hub
name, as for the MONAI ResNets; the weights are fetched as a state dict and loaded
with the same checks and first-convolution rule
(:func:`unshortcut.models.pretrained.load_into`), using the model's own
``pretrained_cfg`` for the names of its first convolution and classifier. Fetching
fails offline: that becomes a clear error instead of a network traceback.
"""

from __future__ import annotations

from torch import nn

from unshortcut.errors import UnshortcutError
from unshortcut.models.pretrained import load_into, pretrained_state_dict


def build(name: str, in_channels: int, pretrained: bool | str) -> tuple[nn.Module, int]:
    try:
        import timm
    except ImportError:
        raise UnshortcutError(
            f"--model timm:{name}: timm is not installed (pip install 'unshortcut[timm]')"
        ) from None
    if not (timm.is_model(name) or name.startswith("hf-hub:")):
        raise UnshortcutError(f"--model timm:{name}: timm has no model named {name!r}")
    net = timm.create_model(name, pretrained=False, in_chans=in_channels, num_classes=0)
    if pretrained:
        spec = name if pretrained is True else pretrained
        config = net.pretrained_cfg
        load_into(
            net,
            pretrained_state_dict(spec),
            source=str(spec),
            model=f"timm:{name}",
            first_conv=config.get("first_conv") or (),
            classifier=config.get("classifier"),
        )
    return net, int(net.num_features)
