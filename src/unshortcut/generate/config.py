"""The generator's configuration: one validated object, from a preset, a TOML file and flags.

Two presets size the model and the budget: ``cpu`` (a narrow U-Net that trains on
the default synthetic benchmark in minutes on one core) and ``gpu`` (a wider U-Net
with attention, many more epochs). A TOML file and then command-line flags override
any field of the preset. ``GEN_RUN/config.json`` stores the resolved object plus
what was fitted on the data (conditions, pixel scaling), so a run can be resumed
and sampled from anywhere.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from unshortcut.errors import UnshortcutError

PresetName = Literal["cpu", "gpu"]

PRESETS: dict[str, dict[str, Any]] = {
    # About 30 ms per 32 px patch and training step on one CPU core; small batches give
    # the most updates for the compute (docs/generate.md).
    "cpu": {
        "widths": [32, 64, 64],
        "res_blocks": 1,
        "attention": [False, False, False],
        "norm_groups": 8,
        "epochs": 6,
        "batch_size": 16,
        "lr": 2e-3,
        "warmup_steps": 200,
        "ema_decay": 0.998,
        "sample_steps": 25,
    },
    # The DDPM/ADM-style width for 32-64 px patches; attention at the coarse levels.
    "gpu": {
        "widths": [64, 128, 256, 256],
        "res_blocks": 2,
        "attention": [False, False, True, True],
        "norm_groups": 16,
        "epochs": 300,
        "batch_size": 128,
        "lr": 2e-4,
        "warmup_steps": 1000,
        "ema_decay": 0.9995,
        "sample_steps": 50,
    },
}

# Fields that may differ when resuming: where and how fast, how long, and sampling
# defaults. Everything else must match the run's config.json.
RESUME_FREE_FIELDS = frozenset(
    {
        "out",
        "device",
        "num_threads",
        "epochs",
        "sample_steps",
        "guidance_scale",
        "sample_batch",
        "quality_epochs",
    }
)


class GeneratorConfig(BaseModel):
    """Every setting of a generator run (docs/generate.md explains the defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    patches: Path = Field(description="patch set whose training split the generator learns")
    out: Path = Field(description="generator run folder to write")
    preset: PresetName = "cpu"
    conditions: list[str] = Field(
        default_factory=list,
        description="columns to condition on besides the label; empty: tissue_ratio and "
        "every categorical metadata column. 'col:cat' / 'col:num' force the kind",
    )
    with_mask: bool = Field(True, description="generate the tumor mask as an extra channel")
    widths: list[int] = Field(default_factory=lambda: [32, 64, 64], min_length=1)
    res_blocks: int = Field(1, ge=1)
    attention: list[bool] = Field(default_factory=lambda: [False, False, False])
    head_channels: int = Field(32, ge=1)
    norm_groups: int = Field(
        8,
        ge=1,
        description="GroupNorm groups; MONAI adds the time and condition embedding just "
        "before a GroupNorm, which erases it when a group holds a single channel",
    )
    timesteps: int = Field(1000, ge=2)
    schedule: Literal["cosine", "linear_beta", "scaled_linear_beta"] = "cosine"
    prediction: Literal["epsilon", "v_prediction"] = Field(
        "v_prediction",
        description="what the network predicts: the velocity (default, well conditioned at "
        "every noise level) or the noise (MeDi's epsilon)",
    )
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(200, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.998, ge=0, lt=1)
    cond_dropout: float = Field(
        0.1, ge=0, le=1, description="probability that all conditions are nulled (guidance)"
    )
    cond_dropout_each: float = Field(
        0.1, ge=0, le=1, description="probability that each condition alone is nulled"
    )
    augment: bool = Field(True, description="random flips and 90-degree rotations")
    pixel_percentiles: tuple[float, float] = (0.1, 99.9)
    sample_steps: int = Field(25, ge=1)
    guidance_scale: float = Field(2.0, ge=0)
    sample_batch: int = Field(128, ge=1)
    quality_epochs: int = Field(8, ge=1)
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> GeneratorConfig:
        if len(self.attention) != len(self.widths):
            raise ValueError(f"attention has {len(self.attention)} levels, widths has "
                             f"{len(self.widths)}")  # fmt: skip
        if any(w % self.norm_groups or w < 2 * self.norm_groups for w in self.widths):
            raise ValueError(
                f"every width must be a multiple of norm_groups ({self.norm_groups}) with at "
                "least 2 channels per group (one channel per group erases the conditioning)"
            )
        attending = [w for w, a in zip(self.widths, self.attention, strict=True) if a]
        if any(w % self.head_channels for w in [*attending, self.widths[-1]]):
            raise ValueError(
                f"head_channels ({self.head_channels}) must divide the last width (the middle "
                "block always attends) and every width with attention"
            )
        lo, hi = self.pixel_percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError("pixel_percentiles must satisfy 0 <= low < high <= 100")
        if self.sample_steps > self.timesteps:
            raise ValueError(f"sample_steps ({self.sample_steps}) exceeds timesteps")
        return self

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def load_generator_config(file: Path | None = None, **flags: Any) -> GeneratorConfig:
    """Preset, then TOML file, then flags that are not ``None`` (later wins).

    The preset is named by the ``preset`` flag, else by the file, else ``cpu``.
    """
    data: dict[str, Any] = {}
    if file is not None:
        try:
            data = tomllib.loads(Path(file).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise UnshortcutError(f"{file}: unreadable config ({error})") from None
    for key, value in flags.items():
        if value is not None and not (isinstance(value, list | tuple) and not value):
            data[key] = value
    preset = data.get("preset", "cpu")
    source = str(file) if file is not None else "options"
    if preset not in PRESETS:
        raise UnshortcutError(f"{source}: preset must be one of {', '.join(PRESETS)}")
    try:
        return GeneratorConfig(**(PRESETS[preset] | data))
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in error.errors()
        )
        raise UnshortcutError(f"{source}: {problems}") from None


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UnshortcutError("--device cuda: no CUDA device is available")
    return torch.device(name)
