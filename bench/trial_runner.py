"""The hand-made trial runner of the bench scripts that are not sweeps yet.

bench/spatial.py, bench/multi_attribute.py and bench/gerne_defaults.py train their runs
through :class:`Runner` (one folder ``<work>/tau<tau>/<method>[@variant]/trial<k>-seed<s>``
per run, reused when its ``metrics.json`` exists after checking its settings, resumed from
a checkpoint otherwise). bench/robustness.py, which this code came from, runs through
``unshortcut.sweep`` instead (configs/robustness.toml) and re-exports these names so the
other scripts' imports keep working; a script moved onto a sweep stops needing them.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unshortcut.atomic import atomic_write_text
from unshortcut.config import TrainConfig, load_config
from unshortcut.errors import UnshortcutError
from unshortcut.methods import method_names
from unshortcut.runs import config_differences, read_json
from unshortcut.search import PROTOCOLS, Trial, read_run
from unshortcut.train import TrainingDiverged, train

METHODS = tuple(method_names())
"""Every registered method, in registration order (ERM first)."""
KNOWN, UNKNOWN = PROTOCOLS[:2]
"""Attributes known at training; known / unknown at validation."""
SUMMARY_KEYS = (
    "balanced_accuracy",
    "worst_group_accuracy",
    "worst_class_accuracy",
    "accuracy",
    "robust_auroc",
)
DIVERGED = "diverged.txt"
"""Written into a run folder whose training diverged: not selectable, not retried."""


@dataclass(frozen=True)
class Settings:
    """What an experiment varies and what every run shares."""

    taus: tuple[float, ...] = (0.5, 0.75)
    methods: tuple[str, ...] = METHODS
    trials: int = 10
    seeds: int = 3
    epochs: int = 12
    batch_size: int = 64
    model: str = TrainConfig.model_fields["model"].default
    bootstrap: int = 200
    threads: int | None = None
    val_unknown: bool = True


def _same_settings(run: Path, config: TrainConfig) -> None:
    """Refuse to reuse a finished run trained with other settings (the folder says too little)."""
    differ = config_differences(read_json(run / "config.json"), config)
    if differ:
        raise UnshortcutError(
            f"{run}: finished with other settings ({', '.join(differ)}); delete it or pass "
            "another --work"
        )


@dataclass
class Runner:
    """Trains (or reuses) run folders and prints one progress line per run."""

    patches: Path
    work: Path
    settings: Settings
    expected: int
    log: Callable[[str], None] = print
    runs: dict[Path, dict[str, Any]] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)
    start: float = field(default_factory=time.monotonic)

    def folder(self, method: str, tau: float, trial: int, seed: int, variant: str = "") -> Path:
        name = method if not variant else f"{method}@{variant}"
        return self.work / f"tau{tau:g}" / name / f"trial{trial}-seed{seed}"

    def config(self, run: Path, tau: float, trial: Trial, seed: int, variant: str) -> TrainConfig:
        """The settings of one run (an experiment with other groups adds its fields)."""
        s = self.settings
        return load_config(
            patches=self.patches,
            out=run,
            method=trial.method,
            hp=dict(trial.hparams),
            taus=[tau],
            seed=seed,
            epochs=s.epochs,
            batch_size=s.batch_size,
            **trial.training,
            model=s.model,
            bootstrap=s.bootstrap,
            num_threads=s.threads,
        )

    def run(self, tau: float, trial: Trial, seed: int, variant: str = "") -> Path:
        """The run folder of ``trial`` (an ablation ``variant`` of it) at ``seed``, trained
        unless already finished."""
        run = self.folder(trial.method, tau, trial.index, seed, variant)
        if run in self.runs:
            return run
        config = self.config(run, tau, trial, seed, variant)
        began = time.monotonic()
        seconds: float | None = None
        if (run / "metrics.json").is_file() or (run / DIVERGED).is_file():
            _same_settings(run, config)
        else:
            resume = (run / "checkpoints" / "last.pt").is_file()
            # Every run repeats the data warnings (one-class split...): show each text once.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    train(config, resume=resume, overwrite=not resume, progress=False)
                except TrainingDiverged as error:
                    atomic_write_text(run / DIVERGED, f"{error}\n")
            seconds = time.monotonic() - began
            for warning in caught:
                if str(warning.message) not in self.warned:
                    self.warned.add(str(warning.message))
                    self.log(f"warning: {warning.message}")
        self.runs[run] = {
            "method": trial.method if not variant else f"{trial.method}@{variant}",
            "tau": tau,
            "trial": trial.index,
            "seed": seed,
            "hparams": dict(trial.hparams) | dict(trial.training),
            "seconds": seconds,
        }
        self._report(run, seconds)
        return run

    def _report(self, run: Path, seconds: float | None) -> None:
        info = self.runs[run]
        if (run / "metrics.json").is_file():
            wga = read_run(run).val_scores.get("worst_group_accuracy")
            outcome = "val WGA n/a" if wga is None else f"val WGA {wga:.3f}"
        else:
            outcome = "diverged"
        took = "reused" if seconds is None else f"{seconds:.0f} s"
        total = time.monotonic() - self.start
        self.log(
            f"[{len(self.runs)}/{self.expected}] {info['method']} tau={info['tau']:g} "
            f"trial {info['trial']} seed {info['seed']}: {outcome} ({took}; "
            f"elapsed {_clock(total)})"
        )


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def finished(runs: list[Path]) -> list[Path]:
    return [run for run in runs if (run / "metrics.json").is_file()]


def mean_std(values: list[float | None]) -> dict[str, Any]:
    """Mean and sample std (ddof 1; 0 for one value) of the defined values."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return {"mean": None, "std": None, "values": values}
    std = float(np.std(kept, ddof=1)) if len(kept) > 1 else 0.0
    return {"mean": float(np.mean(kept)), "std": std, "values": values}


def run_record(run: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Everything the JSON keeps of one run: its settings and, per criterion, val and test."""
    record = {"path": str(run), **info, "status": "diverged"}
    if (run / "metrics.json").is_file():
        metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
        record["status"] = "finished"
        record["by_criterion"] = {
            criterion: {
                "epoch": entry["epoch"],
                **{s: {k: entry[s].get(k) for k in SUMMARY_KEYS} for s in ("val", "test")},
            }
            for criterion, entry in metrics["by_criterion"].items()
        }
    return record
