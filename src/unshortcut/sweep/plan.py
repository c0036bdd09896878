"""A sweep's phases, its status, and its results table.

1. **Trials**: every (dataset, tau, method) cell trains its hyperparameter trials at
   seed 0 (random draws with trial 0 = the defaults, or a grid).
2. **Selection**: per cell and protocol, the trial with the best *validation* score of
   the protocol's criterion (``unshortcut.search.select_best``, which drops every test
   value before looking).
3. **Seeds**: the chosen trial at seeds 0..S-1 (seed 0 is the trial run itself), and
   each ablation variant of the first protocol's choice at the same seeds.
4. **Results**: only now are test values read: per chosen (cell, protocol), the mean,
   standard deviation and 95% t-interval over seeds of every headline metric, at the
   checkpoint the protocol's criterion selected.

Every run is a hashed folder (:mod:`.store`), so a relaunched sweep skips what is done
and resumes what was interrupted; ``sweep_status`` says where a sweep stands without
training anything.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from unshortcut.config import TrainConfig
from unshortcut.errors import UnshortcutError
from unshortcut.methods import get_method
from unshortcut.runs import read_json, write_json
from unshortcut.search import (
    PROTOCOLS,
    Protocol,
    Trial,
    grid_trials,
    random_trials,
    read_run,
    select_best,
)
from unshortcut.sweep.config import SweepConfig
from unshortcut.sweep.launchers import Job, get_launcher
from unshortcut.sweep.store import Status, adopt_run, run_folder, run_status

REPORTED: tuple[str, ...] = (
    "worst_group_accuracy",
    "balanced_accuracy",
    "group_balanced_accuracy",
    "accuracy",
    "worst_class_accuracy",
    "auroc",
    "robust_auroc",
)
"""Test metrics of every results row (mean, std, values, 95% interval over seeds)."""


@dataclass(frozen=True, eq=False)
class PlannedRun:
    """One run of the sweep and why it is there."""

    dataset: str
    tau: float | None
    trial: Trial
    seed: int
    variant: str
    """'' for the trial itself, else the ablation's name."""
    config: TrainConfig

    @property
    def method(self) -> str:
        return self.trial.method if not self.variant else f"{self.trial.method}@{self.variant}"

    @property
    def folder(self) -> Path:
        return self.config.out

    def describe(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "tau": self.tau,
            "method": self.method,
            "trial": self.trial.index,
            "seed": self.seed,
            "hparams": dict(self.config.hp) | dict(self.trial.training),
            "folder": str(self.folder),
        }


@dataclass
class SweepResult:
    """Every run of a sweep with its status, and the results rows."""

    config: SweepConfig
    runs: list[PlannedRun]
    statuses: dict[Path, Status]
    rows: list[dict[str, Any]]
    seconds: dict[Path, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sweep": self.config.name,
            "rows": self.rows,
            "runs": [
                r.describe()
                | {"status": self.statuses[r.folder], "seconds": self.seconds.get(r.folder)}
                for r in self.runs
            ],
        }


# ----------------------------------------------------------------------------- planning


def _train_split(config: SweepConfig, dataset: str, tau: float | None) -> Any:
    """The cell's training split, grouped as its runs will group it (feasible draws)."""
    from unshortcut.train import training_data

    probe = TrainConfig(
        patches=config.datasets[dataset],
        out=config.out,
        taus=[] if tau is None else [tau],
        **config.train,
    )
    return training_data(probe, torch.device("cpu"), splits=("train",)).splits["train"]


def _trials(config: SweepConfig, method: str, split: Any) -> list[Trial]:
    fixed = config.hparams.get(method, {})
    if config.search.mode == "grid":
        trials = grid_trials(method, config.search.points, train=split)
    else:
        trials = random_trials(method, config.search.trials, train=split)
    cls = get_method(method)
    kept = []
    for trial in trials:
        hp = trial.hparams | fixed
        try:
            cls.check_hparams(hp, split)
        except UnshortcutError:
            continue
        kept.append(Trial(trial.method, trial.index, trial.seed, hp, trial.training))
    return kept


def _planned(
    config: SweepConfig,
    dataset: str,
    tau: float | None,
    trial: Trial,
    seed: int,
    variant: str = "",
    override: dict[str, Any] | None = None,
) -> PlannedRun:
    settings = TrainConfig(
        patches=config.datasets[dataset],
        out=config.out,
        method=trial.method,
        hp=trial.hparams | (override or {}),
        taus=[] if tau is None else [tau],
        seed=seed,
        **trial.training,
        **config.train,
    )
    settings = settings.model_copy(update={"out": run_folder(config.out, settings)})
    return PlannedRun(dataset, tau, trial, seed, variant, settings)


def plan_trials(config: SweepConfig) -> dict[tuple[str, float | None], list[PlannedRun]]:
    """Phase 1: per (dataset, tau), every method's trials at seed 0."""
    plan: dict[tuple[str, float | None], list[PlannedRun]] = {}
    splits: dict[tuple[str, float | None], Any] = {}
    for dataset, tau, method in config.cells():
        key = (dataset, tau)
        if key not in splits:
            splits[key] = _train_split(config, dataset, tau)
        trials = _trials(config, method, splits[key])
        plan.setdefault(key, []).extend(_planned(config, dataset, tau, t, 0) for t in trials)
    return plan


def _protocols(config: SweepConfig) -> list[Protocol]:
    return [p for p in PROTOCOLS if p.name in config.search.protocols]


def _cell(run: PlannedRun) -> tuple[str, float | None]:
    return run.dataset, run.tau


def plan_seeds(
    config: SweepConfig, trial_runs: list[PlannedRun], log: Callable[[str], None]
) -> list[tuple[Protocol, list[PlannedRun]]]:
    """Phases 2 and 3 for one (dataset, tau): selection on validation, then seeds.

    Returns, per chosen (protocol, method) and per ablation variant, the seed runs;
    the first protocol's choice also carries the ablations.
    """
    finished = [r for r in trial_runs if run_status(r.folder) == "finished"]
    by_folder = {r.folder: r for r in trial_runs}
    best = select_best([r.folder for r in finished])
    chosen: list[tuple[Protocol, list[PlannedRun]]] = []
    for index, protocol in enumerate(_protocols(config)):
        for method in config.methods:
            summary = best[protocol.name].get(method)
            if summary is None:
                first = trial_runs[0]
                log(
                    f"{method} ({first.dataset}, tau={first.tau}): no finished run eligible "
                    f"under {protocol.name}"
                )
                continue
            picked = by_folder[summary.path]
            seeds = [_planned(config, *_cell(picked), picked.trial, s) for s in range(config.seeds)]
            chosen.append((protocol, seeds))
            if index == 0:
                for variant, override in config.ablations.get(method, {}).items():
                    ablated = [
                        _planned(
                            config, picked.dataset, picked.tau, picked.trial, s, variant, override
                        )
                        for s in range(config.seeds)
                    ]
                    chosen.append((protocol, ablated))
    return chosen


# ----------------------------------------------------------------------------- running


@dataclass
class _Progress:
    """One line per finished run: which, its outcome, how long, elapsed."""

    total: int
    log: Callable[[str], None]
    done: int = 0
    start: float = field(default_factory=time.monotonic)
    warned: set[str] = field(default_factory=set)


def _launch(
    config: SweepConfig,
    runs: list[PlannedRun],
    result: SweepResult,
    progress: _Progress,
) -> None:
    todo: list[PlannedRun] = []
    for run in _unique(runs):
        if run.folder in result.statuses:
            continue
        status = run_status(run.folder)
        if status in ("finished", "diverged"):
            result.statuses[run.folder] = status
            progress.done += 1
            _report(progress, run, status, None)
        else:
            todo.append(run)
        result.runs.append(run)
    jobs = [r.config.model_dump(mode="json") for r in todo]
    lookup = {r.folder: r for r in todo}
    began = {r.folder: time.monotonic() for r in todo}

    def on_done(job: Job, status: Status, warnings: list[str]) -> None:
        run = lookup[Path(job["out"])]
        result.statuses[run.folder] = status
        result.seconds[run.folder] = time.monotonic() - began[run.folder]
        progress.done += 1
        for text in warnings:
            if text not in progress.warned:
                progress.warned.add(text)
                progress.log(f"warning: {text}")
        _report(progress, run, status, result.seconds[run.folder])

    get_launcher(config.launcher.kind)(jobs, config.launcher, on_done)


def _report(progress: _Progress, run: PlannedRun, status: Status, seconds: float | None) -> None:
    outcome = status
    if status == "finished":
        wga = read_run(run.folder).val_scores.get("worst_group_accuracy")
        outcome = "val WGA n/a" if wga is None else f"val WGA {wga:.3f}"
    took = "reused" if seconds is None else f"{seconds:.0f} s"
    tau = "" if run.tau is None else f" tau={run.tau:g}"
    progress.log(
        f"[{progress.done}/{progress.total}] {run.dataset}{tau} {run.method} trial "
        f"{run.trial.index} seed {run.seed}: {outcome} ({took}; elapsed "
        f"{_clock(time.monotonic() - progress.start)})"
    )


def _unique(runs: list[PlannedRun]) -> list[PlannedRun]:
    """Each folder once (a chosen trial's seed 0 is the trial run itself)."""
    return list({r.folder: r for r in runs}.values())


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def run_sweep(config: SweepConfig, log: Callable[[str], None] = print) -> SweepResult:
    """Run (or continue) every phase of ``config``; returns the runs and the results."""
    trials = plan_trials(config)
    n_trials = sum(len(runs) for runs in trials.values())
    variants = sum(len(v) for v in config.ablations.values())
    choices = len(trials) * len(config.methods) * len(config.search.protocols)
    estimate = n_trials + choices * (config.seeds - 1) + len(trials) * variants * config.seeds
    log(f"sweep {config.name}: {n_trials} trial runs, then up to {estimate - n_trials} seed runs")
    result = SweepResult(config, [], {}, [])
    progress = _Progress(estimate, log)
    _launch(config, [r for runs in trials.values() for r in runs], result, progress)
    chosen = {key: plan_seeds(config, runs, log) for key, runs in trials.items()}
    _launch(config, [r for c in chosen.values() for _, seeds in c for r in seeds], result, progress)
    # Every choice is made: only now are test values read.
    result.rows = [results_row(protocol, seeds) for c in chosen.values() for protocol, seeds in c]
    return result


def sweep_status(config: SweepConfig) -> dict[str, Counter[str]]:
    """Counts of run statuses per phase, without training (seeds only once trials are done)."""
    trials = plan_trials(config)
    counts: dict[str, Counter[str]] = {"trials": Counter(), "seeds": Counter()}
    for runs in trials.values():
        counts["trials"].update(run_status(r.folder) for r in runs)
    if set(counts["trials"]) <= {"finished", "diverged"}:
        for runs in trials.values():
            seeds = [r for _, chosen in plan_seeds(config, runs, lambda _: None) for r in chosen]
            counts["seeds"].update(run_status(r.folder) for r in _unique(seeds))
    else:
        counts["seeds"]["waiting for the trials"] = 1
    return counts


def adopt_runs(
    config: SweepConfig,
    locate: Callable[[PlannedRun], Path | None],
    log: Callable[[str], None] = print,
) -> Counter[str]:
    """Adopt into the sweep the finished runs ``locate`` finds for its planned runs.

    For an experiment that ran before it was a sweep: ``locate`` maps a planned run to
    the folder the old layout kept it in (None: none). Trial runs go first, because
    which seed runs exist depends on what the selection chooses among them (seed runs
    are adopted only where every trial run of the cell is there); every
    adopted run is checked against the sweep's configuration (:func:`.store.adopt_run`),
    and what is missing or unfinished is left for the sweep to train. Returns counts of
    adopted, already present, and missing runs.
    """
    counts: Counter[str] = Counter()
    seen: set[Path] = set()  # a chosen trial's seed 0 is the trial run itself

    def adopt(runs: list[PlannedRun]) -> None:
        for run in _unique(runs):
            if run.folder in seen:
                continue
            seen.add(run.folder)
            source = locate(run)
            if source is None or run_status(source) not in ("finished", "diverged"):
                counts["missing"] += 1
            elif adopt_run(source, run.config):
                counts["adopted"] += 1
            else:
                counts["already there"] += 1

    trials = plan_trials(config)
    for runs in trials.values():
        adopt(runs)
    for runs in trials.values():
        if all(run_status(r.folder) in ("finished", "diverged") for r in runs):
            adopt([r for _, seeds in plan_seeds(config, runs, log) for r in seeds])
    return counts


# ----------------------------------------------------------------------------- results


def summary_stat(values: list[float | None]) -> dict[str, Any]:
    """Mean, sample std (ddof 1), the values, and the 95% t-interval of the mean."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return {"mean": None, "std": None, "values": values, "ci95": None}
    mean = float(np.mean(kept))
    std = float(np.std(kept, ddof=1)) if len(kept) > 1 else 0.0
    ci = None
    if len(kept) > 1:
        half = float(stats.t.ppf(0.975, len(kept) - 1)) * std / math.sqrt(len(kept))
        ci = [mean - half, mean + half]
    return {"mean": mean, "std": std, "values": values, "ci95": ci}


def results_row(protocol: Protocol, seeds: list[PlannedRun]) -> dict[str, Any]:
    """One results row: the chosen setting and its test metrics over seeds."""
    first = seeds[0]
    runs = [r.folder for r in seeds]
    return {
        "dataset": first.dataset,
        "tau": first.tau,
        "method": first.method,
        "variant": first.variant,
        "protocol": protocol.name,
        "criterion": protocol.criterion,
        "trial": first.trial.index,
        "hparams": dict(first.config.hp) | dict(first.trial.training),
        "seeds_finished": sum(run_status(run) == "finished" for run in runs),
        "seeds_run": len(seeds),
        "runs": [str(run) for run in runs],
        **_test_stats(runs, protocol.criterion),
    }


def checkpoint_row(row: dict[str, Any], criterion: str) -> dict[str, Any]:
    """The runs of a results ``row`` scored at the checkpoint ``criterion`` selected.

    The trial stays the one the row's protocol chose; only the epoch changes, so rows
    for two criteria show what the checkpoint choice alone does (e.g. validation
    balanced accuracy, which needs no groups, against worst-group accuracy).
    """
    keys = ("dataset", "tau", "method", "variant", "protocol", "trial")
    return {k: row[k] for k in keys} | {
        "selected_by": criterion,
        **_test_stats([Path(run) for run in row["runs"]], criterion),
    }


def _test_stats(runs: list[Path], criterion: str) -> dict[str, dict[str, Any]]:
    """Per reported metric, its summary over the finished ``runs`` at ``criterion``'s
    checkpoint (read only once every choice is made)."""
    tests = [
        read_json(run / "metrics.json")["by_criterion"][criterion]["test"]
        for run in runs
        if run_status(run) == "finished"
    ]
    return {key: summary_stat([t.get(key) for t in tests]) for key in REPORTED}


def write_results(result: SweepResult) -> Path:
    """``<out>/results.json``: the rows (robustness.json's layout) and every run's status."""
    path = result.config.out / "results.json"
    write_json(path, result.to_dict())
    return path
