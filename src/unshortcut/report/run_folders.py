"""Read finished run folders (ARCHITECTURE 3.4) with json and pandas only.

Audits and reports read runs that may come from another machine or version, so they
rely on the run folder contract, never on the training code: ``config.json``,
``metrics.json``, ``history.jsonl`` and ``predictions/<split>.parquet``. Unknown keys
and columns are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from unshortcut.errors import UnshortcutError
from unshortcut.sealed import read_sealed

PREDICTION_COLUMNS = ("patch_id", "image_id", "label", "score", "prediction")


def _read_json(path: Path) -> dict[str, Any]:
    data = read_sealed(path)
    if not isinstance(data, dict):
        raise UnshortcutError(f"{path}: expected a JSON object")
    return data


@dataclass(frozen=True)
class RunFolder:
    """One finished run: its resolved configuration and final metrics."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]

    @classmethod
    def open(cls, path: Path | str) -> RunFolder:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise UnshortcutError(f"{path}: not a run folder (no config.json)")
        if not (path / "metrics.json").is_file():
            raise UnshortcutError(f"{path}: the run is unfinished (no metrics.json)")
        return cls(path, _read_json(path / "config.json"), _read_json(path / "metrics.json"))

    @property
    def method(self) -> str:
        return str(self.config.get("method", "?"))

    @property
    def seed(self) -> int | None:
        seed = self.config.get("seed")
        return None if seed is None else int(seed)

    @property
    def criterion(self) -> str:
        return str(self.metrics.get("selection", {}).get("criterion", "?"))

    @property
    def patches(self) -> Path | None:
        """The run's patch set: absolute, or relative to the run folder (else as written)."""
        value = self.config.get("patches")
        if not value:
            return None
        path = Path(value)
        if path.is_absolute() or not (self.path / path).exists():
            return path
        return self.path / path

    def history(self) -> list[dict[str, Any]]:
        """One entry per evaluated epoch; empty when the run has no history.jsonl."""
        file = self.path / "history.jsonl"
        if not file.is_file():
            return []
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
            return [json.loads(line) for line in lines if line.strip()]
        except (OSError, ValueError) as error:
            raise UnshortcutError(f"{file}: unreadable ({error})") from None

    def has_predictions(self, split: str) -> bool:
        return (self.path / "predictions" / f"{split}.parquet").is_file()

    def predictions(self, split: str) -> pd.DataFrame | None:
        """The scored rows of ``predictions/<split>.parquet`` (contract columns checked;
        rows the method trained on, ``trained_on``, left out as the metrics leave them
        out), or None when absent."""
        file = self.path / "predictions" / f"{split}.parquet"
        if not file.is_file():
            return None
        try:
            table = pd.read_parquet(file)
        except Exception as error:
            raise UnshortcutError(f"{file}: unreadable ({error})") from None
        missing = [c for c in PREDICTION_COLUMNS if c not in table.columns]
        if missing:
            raise UnshortcutError(f"{file}: missing columns {', '.join(missing)}")
        if "trained_on" in table.columns:
            table = table[~table["trained_on"].astype(bool)].reset_index(drop=True)
        return table


def find_runs(root: Path | str) -> list[RunFolder]:
    """``root`` itself when it is a run folder, else every run folder below it, sorted by path.

    A run folder holds config.json and metrics.json; evaluation folders inside runs
    (metrics.json without config.json) are not runs.
    """
    root = Path(root)
    if not root.is_dir():
        raise UnshortcutError(f"{root}: no such folder")
    if (root / "config.json").is_file():
        return [RunFolder.open(root)]
    folders = sorted(
        p.parent for p in root.rglob("metrics.json") if (p.parent / "config.json").is_file()
    )
    if not folders:
        raise UnshortcutError(
            f"{root}: no run folders below it (a run folder holds config.json and metrics.json)"
        )
    return [RunFolder.open(folder) for folder in folders]
