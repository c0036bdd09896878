"""The sweep file: datasets, methods, taus, seeds, the search, shared training settings.

A sweep is data, so a benchmark is a file in configs/ (``unshortcut sweep FILE``)::

    name = "robustness"
    out = "../bench/work/sweeps/robustness"      # relative paths: to this file
    methods = ["erm", "gerne"]                   # default: every registered method
    taus = [0.5, 0.75]                           # [] : the attributes set their own bins
    seeds = 3

    [datasets]
    synth = "../bench/work/data/synth/patches"

    [search]                                     # per dataset, tau and method
    mode = "random"                              # or "grid"
    trials = 3                                   # random: trial 0 holds the defaults
    points = 3                                   # grid: points per range
    protocols = ["train-known/val-known", "train-known/val-unknown"]

    [train]                                      # any TrainConfig field, for every run
    epochs = 12
    num_threads = 1

    [hparams.gerne]                              # fixed hyperparameters (not searched)
    bn = "separate"

    [ablations.gerne]                            # the chosen trial again with overrides
    bn-joint = { bn = "joint" }

    [launcher]
    kind = "local"                               # or "ray"
    workers = 1
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from unshortcut.config import TrainConfig
from unshortcut.errors import UnshortcutError
from unshortcut.methods import get_method, method_names
from unshortcut.search import PROTOCOLS

# TrainConfig fields a sweep sets itself, per run.
_SWEEP_FIELDS = frozenset({"patches", "out", "method", "hp", "taus", "seed", "lr", "weight_decay"})


class SearchSettings(BaseModel):
    """How each (dataset, tau, method) cell picks its hyperparameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: str = Field("random", pattern="^(random|grid)$")
    trials: int = Field(3, ge=1, description="random trials per cell (trial 0: defaults)")
    points: int = Field(3, ge=1, description="grid points per hyperparameter range")
    protocols: list[str] = Field(default_factory=lambda: [PROTOCOLS[0].name])

    @field_validator("protocols")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        known = [p.name for p in PROTOCOLS]
        unknown = [p for p in value if p not in known]
        if unknown or not value:
            raise ValueError(f"unknown protocols {unknown or '(none)'}; use {known}")
        return value


class LauncherSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = "local"
    workers: int = Field(1, ge=1, description="runs at once (local processes, Ray tasks)")
    address: str | None = Field(None, description="Ray cluster address (default: a local one)")


class SweepConfig(BaseModel):
    """A validated sweep file; paths are absolute once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    out: Path
    datasets: dict[str, Path]
    methods: list[str] = Field(default_factory=method_names)
    taus: list[float] = Field(default_factory=lambda: [0.5])
    seeds: int = Field(3, ge=1)
    search: SearchSettings = Field(default_factory=SearchSettings)
    train: dict[str, Any] = Field(default_factory=dict)
    hparams: dict[str, dict[str, Any]] = Field(default_factory=dict)
    ablations: dict[str, dict[str, dict[str, Any]]] = Field(default_factory=dict)
    launcher: LauncherSettings = Field(default_factory=LauncherSettings)

    @field_validator("methods")
    @classmethod
    def _registered(cls, value: list[str]) -> list[str]:
        for name in value:
            get_method(name)  # a clear error naming the known methods
        return value

    @field_validator("train")
    @classmethod
    def _training_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(set(value) & _SWEEP_FIELDS)
        unknown = sorted(set(value) - set(TrainConfig.model_fields))
        if clash:
            raise ValueError(f"set per run by the sweep, not in [train]: {', '.join(clash)}")
        if unknown:
            raise ValueError(f"not training settings: {', '.join(unknown)}")
        return value

    def cells(self) -> list[tuple[str, float | None, str]]:
        """(dataset, tau, method) in a stable order; tau None when ``taus`` is empty."""
        taus: list[float | None] = list(self.taus) or [None]
        return [(d, t, m) for d in self.datasets for t in taus for m in self.methods]


def load_sweep(path: Path | str, **overrides: Any) -> SweepConfig:
    """Read a sweep file; its relative paths resolve against its folder. ``overrides``
    (not None) replace top-level keys; an ``out`` override resolves against the current
    directory, like any path typed on a command line."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise UnshortcutError(f"{path}: unreadable sweep file ({error})") from None
    if not isinstance(data.get("out", ""), str):
        raise UnshortcutError(f"{path}: out: must be a folder name in quotes")
    datasets = data.get("datasets", {})
    if not isinstance(datasets, dict) or not all(isinstance(v, str) for v in datasets.values()):
        raise UnshortcutError(f'{path}: datasets: must be a table of name = "folder" lines')
    base = path.resolve().parent
    if "out" in data:
        data["out"] = (base / Path(data["out"]).expanduser()).resolve()
    datasets = dict(data.get("datasets", {}))
    data["datasets"] = {
        name: (base / Path(folder).expanduser()).resolve() for name, folder in datasets.items()
    }
    data |= {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("out") is not None:
        data["out"] = Path(overrides["out"]).expanduser().resolve()
    try:
        return SweepConfig(**data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'sweep'}: {e['msg']}" for e in error.errors()
        )
        raise UnshortcutError(f"{path}: {problems}") from None
