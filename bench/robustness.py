"""Robustness table (the paper's table, arXiv 2511.13527): every method tuned alike, then seeds.

For each tau and method: ``--trials`` random hyperparameter draws from
``unshortcut.search.random_trials`` (trial 0 = the defaults), each trained with seed 0;
per method, the best trial by validation worst-group accuracy (attributes known at
validation, ``unshortcut.search.select_best``), and, from the same runs, the best by
validation worst-class accuracy (attributes unknown at validation); then ``--seeds``
seeds (0..S-1, seed 0 reused) of each chosen trial. Test values are read only once every
choice is made. Reported: test balanced accuracy (BCA) and worst-group accuracy (WGA)
at the checkpoint the protocol's criterion selected, mean +- std over seeds; for erm and
gerne also the checkpoint selected by validation BCA against the one selected by WGA.

Every run has its own folder ``<work>/<dataset>/tau<tau>/<method>/trial<k>-seed<s>/``
and is skipped when its ``metrics.json`` exists (after checking it was trained with the
same settings); a folder with a checkpoint but no metrics is resumed, one without a
checkpoint restarted, so a crashed or timed-out experiment continues where it stopped.
Patch sets are built once and cached under ``bench/work/data/``.

Usage: python bench/robustness.py [--dataset synth|layouts|camelyon16] [--trials N]
       [--seeds S] [--methods erm gerne ...] [--taus 0.5 0.75] [--epochs 12] ...
Writes the dataset's entry of bench/results/robustness.json (one entry per dataset,
the others kept), the "## Robustness (<dataset>)" section of docs/benchmarks.md (other
sections are kept) and the "## What our benchmark shows" section of each method card
in docs/methods/ (from every dataset in robustness.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unshortcut.atomic import atomic_write_text
from unshortcut.config import TrainConfig, load_config
from unshortcut.errors import UnshortcutError
from unshortcut.inference import resolve_device
from unshortcut.methods import GroupedSplit, method_names
from unshortcut.runs import config_differences, read_json
from unshortcut.search import Protocol, Trial, random_trials, read_run, select_best
from unshortcut.synth.config import RECOMMENDED_PATCHIFY, SynthConfig
from unshortcut.synth.generate import generate_dataset
from unshortcut.tiling.patchify import PatchifyConfig, patchify
from unshortcut.tiling.patchset import PatchSet
from unshortcut.train import TrainingDiverged, train, training_data

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
DATA_CACHE = ROOT / "bench" / "work" / "data"
DATASETS = ("synth", "layouts", "camelyon16")
METHODS = tuple(method_names())
"""Every registered method, in registration order (ERM first)."""
ABLATIONS: dict[str, dict[str, dict[str, Any]]] = {"gerne": {"bn-joint": {"bn": "joint"}}}
"""Per method, variants of its chosen trial run with the same seeds (name: hp override)."""
LAYOUT_SIZE = 2048
"""Longest image side for the layouts set: 32 images render in about 30 s on one core."""
KNOWN = Protocol(train_attributes=True, val_attributes=True)
UNKNOWN = Protocol(train_attributes=True, val_attributes=False)
CHECKPOINT_METHODS = ("erm", "gerne")
CHECKPOINT_CRITERIA = ("balanced_accuracy", "worst_group_accuracy")
SUMMARY_KEYS = (
    "balanced_accuracy",
    "worst_group_accuracy",
    "worst_class_accuracy",
    "accuracy",
    "robust_auroc",
)
REPORTED = ("balanced_accuracy", "worst_group_accuracy", "robust_auroc")
"""Test metrics every table row reports (mean, std and values over seeds)."""
DIVERGED = "diverged.txt"
"""Written into a run folder whose training diverged: not selectable, not retried."""


@dataclass(frozen=True)
class Settings:
    """What the experiment varies and what every run shares."""

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

    def protocols(self) -> tuple[Protocol, ...]:
        return (KNOWN, UNKNOWN) if self.val_unknown else (KNOWN,)

    def expected_runs(self) -> tuple[int, int, int, int]:
        """(trial runs, seed runs of the main protocol, at most this many more for the
        other protocol, ablation runs)."""
        cells = len(self.methods) * len(self.taus)
        extra = cells * (self.seeds - 1) if self.val_unknown else 0
        variants = sum(len(ABLATIONS.get(m, {})) for m in self.methods)
        return (
            cells * self.trials,
            cells * (self.seeds - 1),
            extra,
            variants * len(self.taus) * self.seeds,
        )


# ----------------------------------------------------------------------------- data


def build_patches(dataset: str, cache: Path = DATA_CACHE) -> Path:
    """The dataset's patch set, built once under ``cache/<name>/`` (written atomically)."""
    folder = cache / (f"layouts-{LAYOUT_SIZE}" if dataset == "layouts" else dataset)
    patches = folder / "patches"
    if patches.is_dir():
        return patches
    if dataset == "camelyon16":
        source = _shared("camelyon16")
        config = PatchifyConfig(
            patch_size=32, input_size=32, split_unit="region", min_object_size=4
        )
    else:
        synth = (
            SynthConfig(seed=0, layouts=_shared("camelyon17-layouts"), size=LAYOUT_SIZE)
            if dataset == "layouts"
            else SynthConfig(seed=0)
        )
        source = folder / "data"
        if not source.is_dir():
            print(f"generating the {dataset} images into {source}", flush=True)
            generate_dataset(synth, source)
        config = PatchifyConfig(**RECOMMENDED_PATCHIFY, seed=0)
    print(f"patchifying {source} into {patches}", flush=True)
    patchify(source, patches, config)
    return patches


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        raise UnshortcutError(f"{path}: the shared real-data folder is missing")
    return path


def train_split(patches: Path, tau: float) -> GroupedSplit:
    """The training split grouped at ``tau`` (GERNE's beta draws must respect its beta_max)."""
    config = load_config(patches=patches, out=patches, taus=[tau])  # nothing is written
    return training_data(config, torch.device("cpu"), splits=("train",)).splits["train"]


# ----------------------------------------------------------------------------- runs


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


def split_counts(patches: Path) -> dict[str, dict[str, int]]:
    table = PatchSet.open(patches).table
    counts = {}
    for split in ("train", "val", "test"):
        labels = table.loc[table["split"] == split, "label"]
        counts[split] = {"patches": len(labels), "tumor": int(labels.sum())}
    return counts


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def finished(runs: list[Path]) -> list[Path]:
    return [run for run in runs if (run / "metrics.json").is_file()]


def scores_at(run: Path, criterion: str) -> dict[str, Any]:
    """Test metrics at the checkpoint ``criterion`` selected (read after every choice)."""
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    return metrics["by_criterion"][criterion]["test"]


def mean_std(values: list[float | None]) -> dict[str, Any]:
    """Mean and sample std (ddof 1; 0 for one value) of the defined values."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return {"mean": None, "std": None, "values": values}
    std = float(np.std(kept, ddof=1)) if len(kept) > 1 else 0.0
    return {"mean": float(np.mean(kept)), "std": std, "values": values}


def summarize(trial: Trial, tau: float, protocol: Protocol, runs: list[Path]) -> dict[str, Any]:
    """One table row: test BCA and WGA over the seed runs of the chosen trial."""
    done = finished(runs)
    tests = [scores_at(run, protocol.criterion) for run in done]
    return {
        "method": trial.method,
        "tau": tau,
        "protocol": protocol.name,
        "criterion": protocol.criterion,
        "trial": trial.index,
        "hparams": dict(trial.hparams) | dict(trial.training),
        "seeds_finished": len(done),
        "seeds_run": len(runs),
        "runs": [str(run) for run in runs],
        **{key: mean_std([t.get(key) for t in tests]) for key in REPORTED},
    }


def checkpoint_rows(trial: Trial, tau: float, runs: list[Path]) -> list[dict[str, Any]]:
    """Test BCA and WGA of the checkpoint chosen by validation BCA vs by validation WGA."""
    done = finished(runs)
    rows = []
    for criterion in CHECKPOINT_CRITERIA:
        tests = [scores_at(run, criterion) for run in done]
        rows.append(
            {
                "method": trial.method,
                "tau": tau,
                "selected_by": criterion,
                **{key: mean_std([t.get(key) for t in tests]) for key in REPORTED},
            }
        )
    return rows


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


def run_experiment(
    patches: Path, work: Path, settings: Settings, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Every run of the experiment (reusing finished ones), then the aggregated tables."""
    n_trials, n_seeds, n_extra, n_ablation = settings.expected_runs()
    already = len(list(work.glob("tau*/*/trial*-seed*/metrics.json")))
    log(
        f"expected runs: {n_trials} trials + {n_seeds} seeds"
        + (f" + at most {n_extra} seeds for {UNKNOWN.name}" if n_extra else "")
        + (f" + {n_ablation} ablation runs" if n_ablation else "")
        + f"; {already} already finished in {work}"
    )
    expected = n_trials + n_seeds + n_extra + n_ablation
    runner = Runner(patches, work, settings, expected=expected, log=log)
    rows: list[dict[str, Any]] = []
    selection_rows: list[dict[str, Any]] = []
    ablation_rows: list[dict[str, Any]] = []
    for tau in settings.taus:
        split = train_split(patches, tau)
        trials = {m: random_trials(m, settings.trials, train=split) for m in settings.methods}
        folders = {m: [runner.run(tau, t, seed=0) for t in trials[m]] for m in settings.methods}
        best = select_best(finished([f for m in settings.methods for f in folders[m]]))
        chosen: list[tuple[Protocol, Trial, list[Path]]] = []
        for protocol in settings.protocols():
            for method in settings.methods:
                summary = best[protocol.name].get(method)
                if summary is None:
                    log(f"{method} tau={tau:g}: no finished run eligible under {protocol.name}")
                    continue
                trial = trials[method][folders[method].index(summary.path)]
                seeds = [runner.run(tau, trial, seed) for seed in range(settings.seeds)]
                chosen.append((protocol, trial, seeds))
        ablated = [
            (replace(trial, hparams=trial.hparams | override), variant)
            for protocol, trial, _ in chosen
            if protocol == KNOWN
            for variant, override in ABLATIONS.get(trial.method, {}).items()
        ]
        ablation_seeds = [
            [runner.run(tau, trial, seed, variant) for seed in range(settings.seeds)]
            for trial, variant in ablated
        ]
        # Every choice at this tau is made: only now are test values read.
        for protocol, trial, seeds in chosen:
            rows.append(summarize(trial, tau, protocol, seeds))
            if protocol == KNOWN and trial.method in CHECKPOINT_METHODS:
                selection_rows.extend(checkpoint_rows(trial, tau, seeds))
        for (trial, variant), seeds in zip(ablated, ablation_seeds, strict=True):
            ablation_rows.append(
                summarize(trial, tau, KNOWN, seeds) | {"method": f"{trial.method}@{variant}"}
            )
    trained = [info["seconds"] for info in runner.runs.values() if info["seconds"] is not None]
    return {
        "settings": asdict(settings),
        "patches": str(patches),
        "counts": split_counts(patches),
        "rows": rows,
        "checkpoint_selection": selection_rows,
        "ablation": ablation_rows,
        "floors": floors(rows),
        "runs_trained": len(trained),
        "runs_reused": len(runner.runs) - len(trained),
        "seconds_per_trained_run": float(np.mean(trained)) if trained else None,
        "runs": [run_record(run, info) for run, info in runner.runs.items()],
    }


# ----------------------------------------------------------------------------- report


def floors(rows: list[dict[str, Any]]) -> str | None:
    """The floors line: GERNE's WGA gain over ERM per tau (floor +7 points) and its BCA cost.

    "Within 3 points" means GERNE's mean test BCA is at most 3 points below ERM's at every tau.
    """
    known = {(r["method"], r["tau"]): r for r in rows if r["protocol"] == KNOWN.name}
    taus = sorted({tau for method, tau in known if method == "gerne" and ("erm", tau) in known})
    if not taus:
        return None

    def gap(tau: float, key: str) -> float | None:
        g, e = known[("gerne", tau)][key]["mean"], known[("erm", tau)][key]["mean"]
        return None if g is None or e is None else 100 * (g - e)

    wga = ", ".join(
        f"at tau={tau:g}: {_points(gap(tau, 'worst_group_accuracy'))} (floor +7)" for tau in taus
    )
    bca = [gap(tau, "balanced_accuracy") for tau in taus]
    within = "yes" if all(b is not None and b >= -3 for b in bca) else "no"
    detail = ", ".join(f"tau={tau:g}: {_points(b)}" for tau, b in zip(taus, bca, strict=True))
    return (
        f"GERNE WGA - ERM WGA {wga}; GERNE BCA within 3 points of ERM: {within} "
        f"(GERNE - ERM BCA {detail})"
    )


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f} points"


def _pct(stat: dict[str, Any]) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def _table_row(r: dict[str, Any], last: str) -> str:
    """A markdown row: method, tau, test BCA / WGA / robust AUROC (mean ± std), ``last``."""
    seeds = r["seeds_finished"], r["seeds_run"]
    note = "" if seeds[0] == seeds[1] else f" ({seeds[0]}/{seeds[1]} seeds)"
    auroc = r.get("robust_auroc")
    return (
        f"| {r['method']} | {r['tau']:g} | {_pct(r['balanced_accuracy'])}{note} | "
        f"{_pct(r['worst_group_accuracy'])} | {_pct(auroc) if auroc else 'n/a'} | {last} |"
    )


def _hparams(hp: dict[str, Any]) -> str:
    if not hp:
        return "(none)"
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items())


def markdown(dataset: str, result: dict[str, Any], context: dict[str, str]) -> str:
    """The "## Robustness (<dataset>)" section: tables, floors, command, date, machine."""
    s = result["settings"]
    lines = [
        f"## Robustness ({dataset})",
        "",
        f"Every method gets {s['trials']} random hyperparameter trials (`unshortcut.search`, "
        f"trial 0 = defaults) at seed 0, then {s['seeds']} seeds of the trial chosen on "
        f"validation only; epochs {s['epochs']}, batch size {s['batch_size']}, "
        "learning rate and weight decay searched with the method's own hyperparameters, "
        f"model {s['model']}, bootstrap {s['bootstrap']}; patch set `{result['patches']}`. "
        "Test metrics in %, mean ± std over seeds, at the checkpoint selected by the same "
        "validation criterion as the trial.",
        "",
        "Patches per split (tumor / non-tumor): "
        + ", ".join(
            f"{split} {c['patches']} ({c['tumor']} / {c['patches'] - c['tumor']})"
            for split, c in result["counts"].items()
        )
        + ".",
        "",
    ]
    titles = {
        KNOWN.name: "Attributes known at validation (selection by worst-group accuracy):",
        UNKNOWN.name: "Attributes unknown at validation (selection by worst-class accuracy):",
    }
    for protocol in (KNOWN, UNKNOWN):
        rows = [r for r in result["rows"] if r["protocol"] == protocol.name]
        if not rows:
            continue
        lines += [
            titles[protocol.name],
            "",
            "| method | tau | test BCA | test WGA | test robust AUROC | selected hyperparameters |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(_table_row(r, f"trial {r['trial']}: {_hparams(r['hparams'])}"))
        if protocol == UNKNOWN:
            known = dict.fromkeys(
                r["method"] for r in result["rows"] if r["protocol"] == KNOWN.name
            )
            missing = [m for m in known if m not in {r["method"] for r in rows}]
            if missing:
                lines += [
                    "",
                    f"Not selectable without validation attributes: {', '.join(missing)}.",
                ]
        lines.append("")
    if result["checkpoint_selection"]:
        lines += [
            "Checkpoint selected by validation balanced accuracy vs by validation worst-group "
            "accuracy (trial chosen as above; test, mean ± std over seeds):",
            "",
            "| method | tau | checkpoint selected by | test BCA | test WGA |",
            "|---|---|---|---|---|",
        ]
        for r in result["checkpoint_selection"]:
            lines.append(
                f"| {r['method']} | {r['tau']:g} | {r['selected_by']} | "
                f"{_pct(r['balanced_accuracy'])} | {_pct(r['worst_group_accuracy'])} |"
            )
        lines.append("")
    if result.get("ablation"):
        lines += [
            "Ablation: the chosen trial with another setting, same seeds (attributes known "
            "at validation):",
            "",
            "| variant | tau | test BCA | test WGA | test robust AUROC | setting |",
            "|---|---|---|---|---|---|",
        ]
        for r in result["ablation"]:
            lines.append(_table_row(r, _hparams(r["hparams"])))
        lines.append("")
    if result["floors"]:
        lines += [f"Floors: {result['floors']}", ""]
    per_run = result["seconds_per_trained_run"]
    lines += [
        f"Command: `{context['command']}`",
        "",
        f"Date: {context['date']}; machine: {context['machine']}; total wall time "
        f"{context['wall']} ({result['runs_trained']} runs trained, "
        f"{result['runs_reused']} reused"
        + ("" if per_run is None else f", {per_run:.0f} s per trained run")
        + ").",
        "",
    ]
    return "\n".join(lines)


CARD_HEADING = "## What our benchmark shows"


def card_section(method: str, tables: dict[str, dict[str, Any]]) -> str:
    """A method card's benchmark section: its rows of every dataset's table, beside ERM's."""
    lines = [
        CARD_HEADING,
        "",
        "Written by `python bench/robustness.py` from `bench/results/robustness.json` "
        "(protocol and every other method in docs/benchmarks.md). Test %, mean ± std over "
        "seeds; trial and checkpoint chosen by validation worst-group accuracy.",
        "",
        "| data | tau | balanced accuracy | worst-group accuracy | ERM worst-group accuracy |",
        "|---|---|---|---|---|",
    ]
    found = False
    ordered = sorted(tables, key=lambda d: DATASETS.index(d) if d in DATASETS else len(DATASETS))
    for dataset in ordered:
        table = tables[dataset]
        known = {(r["method"], r["tau"]): r for r in table["rows"] if r["protocol"] == KNOWN.name}
        for (name, tau), row in known.items():
            if name != method:
                continue
            found = True
            erm = known.get(("erm", tau))
            lines.append(
                f"| {dataset} | {tau:g} | {_pct(row['balanced_accuracy'])} | "
                f"{_pct(row['worst_group_accuracy'])} | "
                f"{_pct(erm['worst_group_accuracy']) if erm else 'n/a'} |"
            )
    if not found:
        return ""
    sizes = [
        f"{d} {tables[d]['counts']['train']['tumor']} / {tables[d]['counts']['train']['patches']}"
        for d in ordered
        if "counts" in tables[d]
    ]
    if sizes:
        lines += ["", f"Training patches (tumor / all): {', '.join(sizes)}."]
    return "\n".join(lines) + "\n"


def update_cards(cards: Path, tables: dict[str, dict[str, Any]]) -> list[Path]:
    """Rewrite the benchmark section of every method card in ``cards`` that has results."""
    written = []
    for card in sorted(cards.glob("*.md")):
        section = card_section(card.stem, tables)
        if section:
            atomic_write_text(card, replace_section(card.read_text(encoding="utf-8"), section))
            written.append(card)
    return written


def replace_section(text: str, section: str) -> str:
    """``text`` with the section of ``section``'s first line (up to the next ``## ``) replaced.

    A section not there yet is appended; every other section is left as it is.
    """
    heading = section.splitlines()[0]
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == heading), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + section
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + section + ("\n" + tail if tail else "")


def machine() -> str:
    device = resolve_device("auto")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU only"
    return (
        f"nproc {len(os.sched_getaffinity(0))} ({platform.machine()}), {name}, "
        f"torch {torch.__version__}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = Settings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="synth")
    p.add_argument("--methods", nargs="+", default=list(defaults.methods))
    p.add_argument("--taus", nargs="+", type=float, default=list(defaults.taus))
    p.add_argument("--trials", type=int, default=defaults.trials, help="random trials per method")
    p.add_argument("--seeds", type=int, default=defaults.seeds, help="seeds of the chosen trial")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--model", default=defaults.model)
    p.add_argument("--bootstrap", type=int, default=defaults.bootstrap)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    p.add_argument(
        "--no-val-unknown",
        action="store_true",
        help="skip the protocol with unknown validation attributes (saves its extra seeds)",
    )
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "robustness")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--cards", type=Path, default=ROOT / "docs" / "methods")
    args = p.parse_args(argv)
    if args.trials < 1 or args.seeds < 1:
        p.error("--trials and --seeds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = Settings(
        taus=tuple(args.taus),
        methods=tuple(args.methods),
        trials=args.trials,
        seeds=args.seeds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        model=args.model,
        bootstrap=args.bootstrap,
        threads=args.threads,
        val_unknown=not args.no_val_unknown,
    )
    started = time.monotonic()
    try:
        patches = build_patches(args.dataset)
        result = run_experiment(patches, args.work / args.dataset, settings)
    except UnshortcutError as error:
        sys.exit(f"error: {error}")
    context = {
        "command": shlex.join(
            ["python", "bench/robustness.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "wall": _clock(time.monotonic() - started),
    }
    section = markdown(args.dataset, result, context)
    print(section)
    results = args.results / "robustness.json"
    tables = json.loads(results.read_text(encoding="utf-8")) if results.is_file() else {}
    tables[args.dataset] = {**result, **context}
    atomic_write_text(results, json.dumps(tables, indent=2) + "\n")
    doc = args.doc
    atomic_write_text(doc, replace_section(doc.read_text(encoding="utf-8"), section))
    cards = update_cards(args.cards, tables)
    print(f"wrote {results}, the section of {doc} and {len(cards)} method cards in {args.cards}")


if __name__ == "__main__":
    main()
