"""Robustness table (the paper's table, arXiv 2511.13527): every method tuned alike, then seeds.

The experiment is data: configs/robustness.toml (datasets, methods, taus, seeds, the
search and its protocols, the GERNE joint-BatchNorm ablation, training settings), run by
``unshortcut.sweep``: per tau and method, random hyperparameter trials at seed 0 (trial 0
= the defaults); per protocol the best trial on validation (worst-group accuracy with
validation attributes, worst-class accuracy without); seeds of each choice; test values
read only once every choice is made. Run folders, resume and skip are the sweep's
(hash-named folders with completion markers, ``unshortcut sweep FILE --status``).

This script builds the patch sets the sweep file names, runs the sweep, and turns its
results into tables: test balanced accuracy (BCA), worst-group accuracy (WGA) and robust
AUROC, mean +- std over seeds, per protocol; for erm and gerne the checkpoint selected
by validation BCA against the one selected by WGA; the ablation; the floors line.

Usage: python bench/robustness.py [--config configs/robustness.toml] [--workers N]
       python bench/robustness.py --adopt bench/work/robustness   # once, see below
Writes each dataset's entry of bench/results/robustness.json (the others kept), the
"## Robustness (<dataset>)" section of docs/benchmarks.md and the "## What our benchmark
shows" section of each method card in docs/methods/ (from every dataset in the JSON).

``--adopt OLD_WORK`` moves an experiment run by this script before it was a sweep (folders
``OLD_WORK/<dataset>/tau<tau>/<method>[@variant]/trial<k>-seed<s>``) into the sweep's
folder: each run is checked against the sweep's configuration and hard-linked under its
hashed name (``unshortcut.sweep.adopt_runs``); nothing is trained.

The hand-made trial runner that other bench scripts still use lives in trial_runner.py;
its names are re-exported here for them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import format_hparams, format_pct
from trial_runner import (
    KNOWN,
    UNKNOWN,
    Runner,
    Settings,
    _clock,
    finished,
    mean_std,
    run_record,
)
from unshortcut.atomic import atomic_write_text
from unshortcut.config import TrainConfig, load_config
from unshortcut.errors import UnshortcutError
from unshortcut.inference import RunData, resolve_device
from unshortcut.methods import GroupedSplit
from unshortcut.sweep import (
    SweepConfig,
    SweepResult,
    adopt_runs,
    checkpoint_row,
    load_sweep,
    run_sweep,
)
from unshortcut.sweep import write_results as write_sweep_results
from unshortcut.sweep.plan import PlannedRun
from unshortcut.synth.config import RECOMMENDED_PATCHIFY, SynthConfig
from unshortcut.synth.generate import generate_dataset
from unshortcut.tiling.patchify import PatchifyConfig, patchify
from unshortcut.tiling.patchset import PatchSet
from unshortcut.train import training_data

__all__ = [  # what the other bench scripts import from here
    "CARD_HEADING",
    "DATA_CACHE",
    "KNOWN",
    "ROOT",
    "SHARED_DATA",
    "Runner",
    "Settings",
    "_clock",
    "build_patches",
    "finished",
    "machine",
    "mean_std",
    "replace_section",
    "run_record",
    "split_counts",
    "train_split",
]

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
DATA_CACHE = ROOT / "bench" / "work" / "data"
CONFIG = ROOT / "configs" / "robustness.toml"
DATASETS = ("synth", "layouts", "camelyon16")
LAYOUT_SIZE = 2048
"""Longest image side for the layouts set: 32 images render in about 30 s on one core."""
CHECKPOINT_METHODS = ("erm", "gerne")
CHECKPOINT_CRITERIA = ("balanced_accuracy", "worst_group_accuracy")


# ----------------------------------------------------------------------------- data


def patch_folder(dataset: str, cache: Path = DATA_CACHE) -> Path:
    """Where ``build_patches`` keeps the dataset (its images, its ``patches``)."""
    return cache / (f"layouts-{LAYOUT_SIZE}" if dataset == "layouts" else dataset)


def build_patches(dataset: str, cache: Path = DATA_CACHE) -> Path:
    """The dataset's patch set, built once under ``cache/<name>/`` (written atomically)."""
    folder = patch_folder(dataset, cache)
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


def train_data(patches: Path, attributes: list[str], taus: list[float]) -> RunData:
    """The patch set's training split prepared as a run with these groups would see it
    (nothing is written): for the feasibility checks and draws that depend on the groups."""
    config = load_config(patches=patches, out=patches, attributes=attributes, taus=taus)
    return training_data(config, torch.device("cpu"), splits=("train",))


def train_split(patches: Path, tau: float) -> GroupedSplit:
    """The training split grouped at ``tau`` (GERNE's beta draws must respect its beta_max)."""
    return train_data(patches, ["tissue_ratio"], [tau]).splits["train"]


def split_counts(patches: Path) -> dict[str, dict[str, int]]:
    table = PatchSet.open(patches).table
    counts = {}
    for split in ("train", "val", "test"):
        labels = table.loc[table["split"] == split, "label"]
        counts[split] = {"patches": len(labels), "tumor": int(labels.sum())}
    return counts


# ----------------------------------------------------------------------------- sweep


def prepare(config: SweepConfig) -> None:
    """Build every patch set the sweep names that is not there yet (only the ones this
    script knows how to build, where it builds them)."""
    for name, patches in config.datasets.items():
        if patches.is_dir():
            continue
        if name not in DATASETS:
            raise UnshortcutError(f"{patches}: missing ({name} is not one of {DATASETS})")
        expected = patch_folder(name) / "patches"
        if expected.resolve() != patches.resolve():
            raise UnshortcutError(f"{patches}: missing; {name} is built at {expected} instead")
        build_patches(name)


def old_layout(root: Path) -> Callable[[PlannedRun], Path]:
    """Where this script kept a run before it was a sweep."""

    def locate(run: PlannedRun) -> Path:
        trial = f"trial{run.trial.index}-seed{run.seed}"
        return root / run.dataset / f"tau{run.tau:g}" / run.method / trial

    return locate


def settings_of(config: SweepConfig, patches: Path) -> dict[str, Any]:
    """What the tables say about the experiment: what it varies, what every run shares."""
    shared = TrainConfig(patches=patches, out=config.out, **config.train)
    return {
        "taus": config.taus,
        "methods": config.methods,
        "trials": config.search.trials,
        "seeds": config.seeds,
        "protocols": config.search.protocols,
        "ablations": config.ablations,
        "epochs": shared.epochs,
        "batch_size": shared.batch_size,
        "model": shared.model,
        "bootstrap": shared.bootstrap,
        "threads": shared.num_threads,
    }


def tables(sweep: SweepResult) -> dict[str, dict[str, Any]]:
    """robustness.json's entry of every dataset of the sweep, from its rows and runs."""
    config, entries = sweep.config, {}
    for dataset, patches in config.datasets.items():
        rows = [r for r in sweep.rows if r["dataset"] == dataset]
        main = [r for r in rows if not r["variant"]]
        runs = [r for r in sweep.runs if r.dataset == dataset]
        trained = [sweep.seconds[r.folder] for r in runs if r.folder in sweep.seconds]
        entries[dataset] = {
            "settings": settings_of(config, patches),
            "sweep": str(config.out),
            "patches": str(patches),
            "counts": split_counts(patches),
            "rows": main,
            "checkpoint_selection": [
                checkpoint_row(row, criterion)
                for row in main
                if row["protocol"] == KNOWN.name and row["method"] in CHECKPOINT_METHODS
                for criterion in CHECKPOINT_CRITERIA
            ],
            "ablation": [r for r in rows if r["variant"]],
            "floors": floors(main),
            "runs_trained": len(trained),
            "runs_reused": len(runs) - len(trained),
            "seconds_per_trained_run": float(np.mean(trained)) if trained else None,
            "runs": [
                run_record(r.folder, r.describe() | {"seconds": sweep.seconds.get(r.folder)})
                for r in runs
            ],
        }
    return entries


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


def _table_row(r: dict[str, Any], last: str) -> str:
    """A markdown row: method, tau, test BCA / WGA / robust AUROC (mean ± std), ``last``."""
    seeds = r["seeds_finished"], r["seeds_run"]
    note = "" if seeds[0] == seeds[1] else f" ({seeds[0]}/{seeds[1]} seeds)"
    auroc = r.get("robust_auroc")
    return (
        f"| {r['method']} | {r['tau']:g} | {format_pct(r['balanced_accuracy'])}{note} | "
        f"{format_pct(r['worst_group_accuracy'])} | "
        f"{format_pct(auroc) if auroc else 'n/a'} | {last} |"
    )


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
            lines.append(_table_row(r, f"trial {r['trial']}: {format_hparams(r['hparams'])}"))
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
                f"{format_pct(r['balanced_accuracy'])} | {format_pct(r['worst_group_accuracy'])} |"
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
            lines.append(_table_row(r, format_hparams(r["hparams"])))
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
                f"| {dataset} | {tau:g} | {format_pct(row['balanced_accuracy'])} | "
                f"{format_pct(row['worst_group_accuracy'])} | "
                f"{format_pct(erm['worst_group_accuracy']) if erm else 'n/a'} |"
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", type=Path, default=CONFIG, help="the sweep file")
    p.add_argument("--out", type=Path, default=None, help="sweep folder [the file's out]")
    p.add_argument("--workers", type=int, default=None, help="runs at once [the file's]")
    p.add_argument(
        "--adopt",
        type=Path,
        metavar="OLD_WORK",
        help="adopt the finished runs of the pre-sweep layout under OLD_WORK, then stop",
    )
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--cards", type=Path, default=ROOT / "docs" / "methods")
    args = p.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        config = load_sweep(args.config, out=args.out)
        if args.workers is not None:
            launcher = config.launcher.model_copy(update={"workers": args.workers})
            config = config.model_copy(update={"launcher": launcher})
        if args.adopt is not None:
            counts = adopt_runs(config, old_layout(args.adopt))
            print(f"{config.out}: " + ", ".join(f"{n} {what}" for what, n in counts.items()))
            return
        prepare(config)
        sweep = run_sweep(config)
    except UnshortcutError as error:
        sys.exit(f"error: {error}")
    write_sweep_results(sweep)
    context = {
        "command": shlex.join(
            ["python", "bench/robustness.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "wall": _clock(time.monotonic() - started),
    }
    results = args.results / "robustness.json"
    entries = json.loads(results.read_text(encoding="utf-8")) if results.is_file() else {}
    doc = args.doc
    text = doc.read_text(encoding="utf-8")
    for dataset, entry in tables(sweep).items():
        section = markdown(dataset, entry, context)
        print(section)
        entries[dataset] = {**entry, **context}
        text = replace_section(text, section)
    atomic_write_text(results, json.dumps(entries, indent=2) + "\n")
    atomic_write_text(doc, text)
    cards = update_cards(args.cards, entries)
    print(f"wrote {results}, {doc} and {len(cards)} method cards in {args.cards}")


if __name__ == "__main__":
    main()
