"""The training configuration: one validated object, from a TOML file and/or CLI flags.

Everything a run depends on is a field here, so ``RUN/config.json`` (this object plus
what is derived from the data: the method's resolved hyperparameters, the fitted
group scheme, the normalisation statistics) is enough to reproduce or resume it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from unshortcut.errors import UnshortcutError
from unshortcut.metrics import SELECTION_CRITERIA

# Model-selection criteria; the first is the default primary one.
CRITERIA: tuple[str, ...] = SELECTION_CRITERIA


class TrainConfig(BaseModel):
    """Every setting of a training run (see docs/training.md for the defaults' reasons)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    patches: Path = Field(description="patch set folder written by `unshortcut patchify`")
    out: Path = Field(description="run folder to write")
    method: str = "erm"
    hp: dict[str, Any] = Field(default_factory=dict, description="method hyperparameters")
    attributes: list[str] = Field(default_factory=lambda: ["tissue_ratio"])
    taus: list[float] = Field(
        default_factory=list, description="thresholds of bare attribute names (default 0.5)"
    )
    method_attributes: list[str] = Field(
        default_factory=list,
        description="groups the method trains with, same syntax as attributes (default: "
        "the run's attributes); metrics and selection always use attributes",
    )
    model: str = "small_cnn"
    pretrained: bool | str = Field(
        False,
        description="False, True (ImageNet weights from the hub), a checkpoint file or a hub name",
    )
    normalize: bool = Field(True, description="per-channel mean/std of the training split")
    augment: bool = True
    hed_jitter: float = Field(
        0.0, ge=0, lt=1, description="HED stain jitter strength (scale and shift); 0 = off"
    )
    stain_normalization: Literal["none", "macenko", "reinhard"] = "none"
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["constant", "cosine"] = "cosine"
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=2)
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    select_by: list[str] = Field(default_factory=lambda: list(CRITERIA))
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the final CIs")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast for training steps and inference; auto: bf16 on CUDA"
    )
    channels_last: Literal["auto", "on", "off"] = Field(
        "auto", description="channels-last memory format for model and batches; auto: on CUDA"
    )
    prefetch: bool = True
    tensorboard: bool = Field(False, description="also write TensorBoard event files")

    @field_validator("patches")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        """Stored resolved, so a run folder opens its patch set from any working directory."""
        return value.expanduser().resolve()

    @field_validator("pretrained", mode="before")
    @classmethod
    def _pretrained(cls, value: Any) -> Any:
        """``imagenet``/``true`` mean True; a checkpoint file is stored resolved (like
        ``patches``), so a run records which file it started from; hub names stay."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.lower() in ("", "false", "none"):
            return False
        if text.lower() in ("true", "imagenet"):
            return True
        from unshortcut.models.pretrained import is_checkpoint_file

        return str(Path(text).expanduser().resolve()) if is_checkpoint_file(text) else text

    @field_validator("select_by")
    @classmethod
    def _known_criteria(cls, value: list[str]) -> list[str]:
        unknown = [c for c in value if c not in CRITERIA]
        if unknown or not value:
            raise ValueError(f"unknown criteria {unknown or '(none given)'}; use {list(CRITERIA)}")
        return list(dict.fromkeys(value))

    @property
    def primary_criterion(self) -> str:
        return self.select_by[0]

    def uses_bf16(self, device_type: str) -> bool:
        """Whether steps run under bf16 autocast: on CUDA by default; on the CPU only when
        asked (faster for the small CNN on some CPUs, but results then depend on the
        CPU's bf16 kernels: see bench/precision.py)."""
        return self.precision == "bf16" or (self.precision == "auto" and device_type == "cuda")

    def uses_channels_last(self, device_type: str) -> bool:
        return self.channels_last == "on" or (
            self.channels_last == "auto" and device_type == "cuda"
        )

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# Fields that may differ when resuming: they change where and how fast, not what.
RESUME_FREE_FIELDS = frozenset({"device", "num_threads", "prefetch", "out", "tensorboard"})
#: Fields a resumed run may raise: more epochs extend it (docs/training.md, "Resume").
RESUME_EXTENDABLE_FIELDS = frozenset({"epochs"})


def load_config(
    file: Path | None = None, base: dict[str, Any] | None = None, **flags: Any
) -> TrainConfig:
    """A config from a TOML file merged with flags; flags that are not ``None`` win.

    Lists given as flags (``--attribute``, ``--tau``, ``--select-by``) replace the
    file's list; ``hp`` flags are merged key by key into the file's ``[hp]`` table.
    ``base`` holds settings under the file's (a run's saved config when resuming).
    """
    data: dict[str, Any] = dict(base or {})
    if file is not None:
        try:
            text = Path(file).read_text(encoding="utf-8")
            data.update(tomllib.loads(text))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
            raise UnshortcutError(f"{file}: unreadable config ({error})") from None
    for key, value in flags.items():
        if value is None or (isinstance(value, list | tuple) and not value):
            continue
        if key == "hp":
            if not isinstance(data.get("hp", {}), dict):
                raise UnshortcutError(f"{file}: hp: must be a table of key = value pairs")
            data["hp"] = {**data.get("hp", {}), **value}
        else:
            data[key] = value
    source = str(file) if file is not None else "options"
    try:
        return TrainConfig(**data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in error.errors()
        )
        raise UnshortcutError(f"{source}: {problems}") from None


def parse_hp(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings to a dict; values are parsed as TOML scalars when they can be."""
    hp: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UnshortcutError(f"--hp: expected key=value, got {item!r}")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        hp[key.strip()] = value
    return hp
