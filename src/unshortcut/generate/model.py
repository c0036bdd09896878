"""The denoising network: MONAI's DiffusionModelUNet with MeDi's summed condition embeddings.

MONAI's U-Net adds ``class_embedding(class_labels)`` to its time embedding, with a
single lookup table. :class:`ConditionalUNet` builds the U-Net with that hook on and
puts :class:`~unshortcut.generate.conditioning.ConditionEmbedding` (one embedding per
condition, summed) in the table's place, so the whole of MONAI's architecture (res
blocks, attention, up/down sampling) is reused unchanged. The network predicts the
noise (epsilon) of every input channel, plus the tumor-mask channel when the
generator makes masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from unshortcut.errors import UnshortcutError
from unshortcut.generate.conditioning import Condition, ConditionEmbedding
from unshortcut.generate.config import GeneratorConfig


class ConditionalUNet(nn.Module):
    """``eps = unet(x_t, t, conditions)`` with conditions as in :mod:`.conditioning`."""

    def __init__(
        self, channels: int, conditions: Sequence[Condition], config: GeneratorConfig
    ) -> None:
        super().__init__()
        self.channels = channels
        self.n_conditions = len(conditions)
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=channels,
            out_channels=channels,
            num_res_blocks=config.res_blocks,
            channels=tuple(config.widths),
            attention_levels=tuple(config.attention),
            norm_num_groups=config.norm_groups,
            num_head_channels=config.head_channels,
            num_class_embeds=1,  # turns the class-embedding hook on; replaced below
        )
        self.unet.class_embedding = ConditionEmbedding(conditions, dim=4 * config.widths[0])

    def forward(self, x: torch.Tensor, t: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        return self.unet(x, timesteps=t, class_labels=conditions)


def check_input_size(size: int, config: GeneratorConfig, source: str) -> None:
    """The U-Net halves the patch ``len(widths) - 1`` times: the side must allow it."""
    factor = 2 ** (len(config.widths) - 1)
    if size % factor:
        raise UnshortcutError(
            f"{source}: patches of {size} px cannot be halved {len(config.widths) - 1} times "
            f"(the U-Net has {len(config.widths)} levels); use fewer widths"
        )
