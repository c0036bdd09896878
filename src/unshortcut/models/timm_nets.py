"""Backbones from timm (optional extra ``unshortcut[timm]``).

``pretrained=True`` downloads weights, which fails offline: that becomes a clear
error instead of a network traceback.
"""

from __future__ import annotations

from torch import nn

from unshortcut.errors import UnshortcutError


def build(
    name: str, in_channels: int, pretrained: bool, features_only: bool = False
) -> tuple[nn.Module, int]:
    """``(net, feature dim)``; with ``features_only`` the net returns its stage maps
    (finest first), which a pixel decoder reads."""
    try:
        import timm
    except ImportError:
        raise UnshortcutError(
            f"--model timm:{name}: timm is not installed (pip install 'unshortcut[timm]')"
        ) from None
    if name not in timm.list_models():
        raise UnshortcutError(f"--model timm:{name}: timm has no model named {name!r}")
    try:
        head = {"features_only": True} if features_only else {"num_classes": 0}
        net = timm.create_model(name, pretrained=pretrained, in_chans=in_channels, **head)
    except (OSError, RuntimeError) as error:
        if not pretrained:
            raise
        raise UnshortcutError(
            f"--model timm:{name}: pretrained weights are unavailable ({error}); "
            "connect to the network once or train without --pretrained"
        ) from None
    if features_only:
        return net, int(net.feature_info.channels()[-1])
    return net, int(net.num_features)
