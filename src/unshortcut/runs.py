"""The run folder (contract 3.4): checking, saving, linking, reading back, loading models.

::

    RUN/config.json               resolved config + method hyperparameters + groups +
                                  normalisation + robust-AUROC bins
    RUN/history.jsonl             one line per epoch: train loss terms, lr, validation metrics
    RUN/checkpoints/last.pt       everything needed to resume (written after every epoch)
    RUN/checkpoints/best-<c>.pt   weights of the best epoch by validation criterion c
    RUN/checkpoints/final-<c>.pt  the same after ``method.finalize`` (what evaluate/predict load)
    RUN/predictions/{val,test}.parquet   at the primary criterion's checkpoint
    RUN/metrics.json              written last: a run without it is unfinished

Every file is written atomically (a temporary name, then a rename), so a reader never
sees half a file. Paths inside config.json are absolute, so a run opens from anywhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from unshortcut import __version__
from unshortcut.atomic import atomic_write_bytes, atomic_write_text
from unshortcut.config import RESUME_FREE_FIELDS, TrainConfig
from unshortcut.data import Normalization
from unshortcut.errors import UnshortcutError
from unshortcut.groups import GroupScheme
from unshortcut.methods import get_method
from unshortcut.models import build_model

CHECKPOINTS = "checkpoints"
LAST = "last.pt"


def jsonable(value: Any) -> Any:
    """NaN/inf become null so JSON files stay strict JSON."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")


def write_history(run: Path, history: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(jsonable(line), allow_nan=False) + "\n" for line in history)
    atomic_write_text(run / "history.jsonl", text)


def save_checkpoint(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, device: torch.device | str) -> Any:
    return torch.load(path, map_location=device, weights_only=False)


def link(source: Path, target: Path) -> None:
    """``target`` becomes the same file as ``source`` (a hard link; a copy where unsupported)."""
    tmp = target.with_name(f".{target.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def config_differences(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """Settings of ``config`` that differ from a run's saved config.json.

    Fields that change only where and how fast a run goes (RESUME_FREE_FIELDS) are
    ignored; saved hyperparameters are resolved (defaults filled in), so only the
    ones ``config`` gives are compared.
    """
    current = config.to_json_dict()
    differ = [
        k for k, v in current.items() if k not in RESUME_FREE_FIELDS | {"hp"} and saved.get(k) != v
    ]
    differ += [f"hp.{k}" for k, v in config.hp.items() if saved.get("hp", {}).get(k) != v]
    return sorted(differ)


def check_run_folder(config: TrainConfig, resume: bool, overwrite: bool) -> bool:
    """Refuse unusable run folders (no side effects); True when there is a checkpoint."""
    out = config.out
    if resume and overwrite:
        raise UnshortcutError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise UnshortcutError(f"{out}: exists and is not a folder")
    if resume:
        if not (out / "config.json").is_file():
            raise UnshortcutError(f"{out}: no run to resume (config.json is missing)")
        differ = config_differences(read_json(out / "config.json"), config)
        if differ:
            raise UnshortcutError(
                f"{out}: --resume with settings that differ from the run's config.json "
                f"({', '.join(differ)})"
            )
        return (out / CHECKPOINTS / LAST).is_file()
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UnshortcutError(
            f"{out}: already holds files (pass --resume to continue the run there "
            "or --overwrite to replace it)"
        )
    return False


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UnshortcutError(f"{path}: unreadable ({error})") from None


def resolved_config(
    config: TrainConfig,
    hp: dict[str, Any],
    scheme: GroupScheme,
    normalization: Normalization,
    robust_bins: list[list[int]],
    channels: int,
    input_size: int,
) -> dict[str, Any]:
    """config.json: the config plus everything derived from the training data, and the
    digest of a ``pretrained`` checkpoint file (which file the run started from)."""
    return jsonable(
        {
            **config.to_json_dict(),
            **_pretrained_digest(config.pretrained),
            "hp": dict(hp),
            "groups": scheme.to_dict(),
            "normalization": normalization.to_dict(),
            "robust_bins_by_class": robust_bins,
            "input": {"channels": channels, "size": input_size},
            "unshortcut_version": __version__,
        }
    )


def _pretrained_digest(pretrained: bool | str) -> dict[str, str]:
    """``{"pretrained_sha256": ...}`` for a checkpoint file, else nothing (hub names,
    True/False). Only recorded: loading a finished run never reads the file again."""
    if isinstance(pretrained, str) and Path(pretrained).is_file():
        with open(pretrained, "rb") as handle:
            return {"pretrained_sha256": hashlib.file_digest(handle, "sha256").hexdigest()}
    return {}


@dataclass
class Run:
    """A run folder's resolved configuration."""

    path: Path
    config: TrainConfig
    resolved: dict[str, Any]

    @property
    def scheme(self) -> GroupScheme:
        return GroupScheme.from_dict(self.resolved["groups"])

    @property
    def normalization(self) -> Normalization:
        return Normalization.from_dict(self.resolved["normalization"])

    @property
    def robust_bins(self) -> list[list[int]]:
        return [list(b) for b in self.resolved["robust_bins_by_class"]]

    @property
    def metrics(self) -> dict[str, Any]:
        path = self.path / "metrics.json"
        if not path.is_file():
            raise UnshortcutError(f"{path}: missing; the run is unfinished (train --resume it)")
        return read_json(path)

    def trained_on_val(self) -> np.ndarray:
        """patch_ids of validation rows the method trained on (DFR), from predictions/."""
        path = self.path / "predictions" / "val.parquet"
        if not path.is_file():
            raise UnshortcutError(f"{path}: missing; the run is unfinished (train --resume it)")
        table = pd.read_parquet(path, columns=["patch_id", "trained_on"])
        return table.loc[table["trained_on"], "patch_id"].to_numpy()


def open_run(path: Path | str) -> Run:
    """Read ``RUN/config.json``; a clear error when ``path`` is not a run folder."""
    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        raise UnshortcutError(f"{path}: not a run folder (no config.json)")
    resolved = read_json(file)
    try:
        fields = {k: v for k, v in resolved.items() if k in TrainConfig.model_fields}
        config = TrainConfig(**fields)
        for key in ("groups", "normalization", "robust_bins_by_class", "input"):
            if key not in resolved:
                raise ValueError(f"no {key!r} entry (written by another version?)")
    except ValueError as error:
        raise UnshortcutError(f"{file}: unreadable run configuration ({error})") from None
    return Run(path, config, resolved)


def build_run_model(
    config: TrainConfig,
    hp: dict[str, Any],
    n_classes: int,
    channels: int,
    input_size: int,
    *,
    pretrained: bool,
) -> nn.Module:
    """The run's architecture, freshly initialised, with the method's model options.

    ``pretrained`` is False where weights are loaded from the run's own checkpoints.
    """
    return build_model(
        config.model,
        channels,
        n_classes,
        input_size,
        pretrained=pretrained and config.pretrained,
        **get_method(config.method).model_options(hp),
    )


def load_model(
    run: Run, criterion: str | None = None, device: torch.device | str = "cpu"
) -> nn.Module:
    """The finalized model selected by ``criterion`` (default: the run's primary one)."""
    criterion = criterion or run.config.primary_criterion
    path = run.path / CHECKPOINTS / f"final-{criterion}.pt"
    if not path.is_file():
        raise UnshortcutError(f"{path}: missing (criteria of this run: {run.config.select_by})")
    info = run.resolved["input"]
    model = build_run_model(
        run.config,
        run.resolved["hp"],
        run.scheme.n_classes,
        int(info["channels"]),
        int(info["size"]),
        pretrained=False,
    )
    model.load_state_dict(load_checkpoint(path, device)["model"])
    return model.to(device).eval()
