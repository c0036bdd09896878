"""Synthetic multimodal microscopy (CARS / TPEF / SHG-like) with a planted tissue shortcut.

``generate_dataset(config, out)`` writes a DATA folder (contract 3.1);
``synthesize_image(config, index)`` renders one image in memory. See docs/synth.md.
"""

from unshortcut.synth.config import RECOMMENDED_PATCHIFY, SynthConfig, make_config
from unshortcut.synth.generate import (
    ImagePlan,
    SynthImage,
    SynthSummary,
    generate_dataset,
    plan_dataset,
    synthesize_image,
)

__all__ = [
    "RECOMMENDED_PATCHIFY",
    "ImagePlan",
    "SynthConfig",
    "SynthImage",
    "SynthSummary",
    "generate_dataset",
    "make_config",
    "plan_dataset",
    "synthesize_image",
]
