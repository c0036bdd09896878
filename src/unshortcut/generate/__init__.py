"""Metadata-guided diffusion augmentation (MeDi): generate patches for under-represented groups.

A conditional denoising diffusion model learns the real training patches given their
label, tissue ratio and categorical metadata; sampled patches for the groups that
training lacks are written, with quality checks, as a new patch set that
``unshortcut train`` reads unchanged. See docs/generate.md.
"""

from unshortcut.generate.augment import GenerationResult, augment_patch_set
from unshortcut.generate.balance import BalancePolicy, plan_counts
from unshortcut.generate.config import GeneratorConfig, load_generator_config
from unshortcut.generate.training import Generator, load_generator, train_generator

__all__ = [
    "BalancePolicy",
    "GenerationResult",
    "Generator",
    "GeneratorConfig",
    "augment_patch_set",
    "load_generator",
    "load_generator_config",
    "plan_counts",
    "train_generator",
]
