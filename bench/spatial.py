"""Spatial specificity: patch labels vs boxes vs pixel masks, alone and with GERNE / reweighting.

Saab et al. (MLHC 2022) trained the same backbone with binary labels, boxes and
segmentation masks and measured robust AUROC (pneumothorax 0.46 / 0.72 / 0.82). This
script does the same on our data, with the machinery of bench/robustness.py: per
dataset and method, ``trials`` random hyperparameter draws (``unshortcut.search``,
trial 0 = defaults) at seed 0, the best by validation worst-group accuracy
(``select_best``), then ``seeds`` seeds of it; test values are read only after every
choice. Reported (test, at the checkpoint validation WGA selected, mean ± std over
seeds): robust AUROC, AUROC, worst-group AUROC, WGA, BCA and, for the spatial methods,
the Dice of the tumor map (pooled over the test pixels, and per group).

Datasets:

- ``synth``: the default synthetic benchmark (bench/robustness.py's patch set);
- ``layouts``: synthetic textures painted on the CAMELYON17 layouts that hold tumor,
  at the image size chosen once (``--calibrate-layouts``, see LAYOUTS_SIZE);
- ``camelyon16``, ``ocdc``, ``bcss``: the real sets in ../shared/data. ocdc and bcss
  hold no glass (tissue ratio 1 on every patch): they are controls grouped by class
  alone (NO_GLASS); camelyon16's one thumbnail holds 6 tumor patches, too few to rank
  methods, and the report says so (MIN_RANKED).

On the synthetic sets the script also measures, on validation only, which aggregation
of the pixel map suits the label (any tumor pixel): ``spatial-mask``'s default trial
with each aggregation, over the same seeds.

Usage: python bench/spatial.py [--datasets synth layouts ...] [--trials 2] [--seeds 3]
       [--epochs 8] [--threads 1]
       python bench/spatial.py --calibrate-layouts     (once; prints the evidence)
Writes bench/results/spatial.json, the "## Spatial supervision" section of
docs/benchmarks.md and the "## What our benchmark shows" section of the spatial
methods' cards.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from common import format_hparams, format_stat
from robustness import (
    DATA_CACHE,
    KNOWN,
    ROOT,
    SHARED_DATA,
    Runner,
    Settings,
    build_patches,
    finished,
    machine,
    mean_std,
    replace_section,
    run_record,
    split_counts,
    train_data,
)
from unshortcut.atomic import atomic_write_text
from unshortcut.config import TrainConfig, load_config
from unshortcut.errors import UnshortcutError
from unshortcut.methods import get_method
from unshortcut.rows import GroupedSplit
from unshortcut.search import Trial, random_trials, select_best
from unshortcut.synth.config import RECOMMENDED_PATCHIFY, SynthConfig
from unshortcut.synth.generate import generate_dataset
from unshortcut.synth.layouts import list_layouts, read_layout
from unshortcut.tiling.patchify import PatchifyConfig, patchify
from unshortcut.tiling.patchset import PatchSet
from unshortcut.train import train

TAU = 0.5
CRITERION = KNOWN.criterion
SPATIAL = ("spatial-box", "spatial-mask", "spatial-mask+gerne", "spatial-mask+reweight")
METHODS = ("erm", *SPATIAL)
COMPONENTS = ("gerne", "reweight")
"""Run alone on the synthetic sets too, to tell whether the combinations add up."""
DATASETS = ("synth", "layouts", "camelyon16", "ocdc", "bcss")
SYNTHETIC = ("synth", "layouts")
AGGREGATIONS = ("max", "topk", "mean")
METRICS = (
    "robust_auroc",
    "auroc",
    "worst_group_auroc",
    "worst_group_accuracy",
    "balanced_accuracy",
)
SEGMENTATION = ("dice", "mean_patch_dice")
REAL_PATCHIFY = {
    # One slide thumbnail on glass, split by spatial region (as bench/robustness.py).
    "camelyon16": None,
    # Ten 640 px H&E tiles of one slide, no glass: split one tile at a time.
    "ocdc": PatchifyConfig(patch_size=64, input_size=32, split_unit="image", seed=0),
    # Three regions of interest without glass, one per split (as bench/real_data.py).
    "bcss": PatchifyConfig(patch_size=128, input_size=32, split_unit="image", seed=0),
}
LAYOUTS_SIZE = 768
"""Longest image side of the layouts set, chosen once by ``--calibrate-layouts``: the
largest of LAYOUTS_CANDIDATES whose patch set holds at least MIN_TUMOR_SHARE tumor
patches (more pixels per layout cell keep more of the real geometry), checked on ERM
alone (docs/benchmarks.md records the numbers). Measured: 9.8% tumor patches at 1024 px
(1564 train patches), 12.4% at 768 px (918 train, 125 tumor); ERM's default trial on
the 768 px set's validation: BCA 50%, WGA 0% (one class everywhere)."""
LAYOUTS_CANDIDATES = (1024, 768, 512)
"""Larger sizes are below the share already in the layouts themselves: counting the
64 px patches over the layout cells (a cell is ``size / longest side`` pixels) gives
5.9% tumor patches at 2048 px and 6.8% at 1536 (9.8% at 1024, 11.7% at 768)."""
MIN_TUMOR_SHARE = 0.10


# ----------------------------------------------------------------------------- data


def tumor_layouts(cache: Path) -> Path:
    """A folder linking the layouts that hold tumor (50 of the 100), built once."""
    folder = cache / "camelyon17-tumor-layouts"
    if not folder.is_dir():
        tmp = folder.with_name(folder.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for path in list_layouts(SHARED_DATA / "camelyon17-layouts"):
            if (read_layout(path) == 2).any() and not (tmp / path.name).exists():
                (tmp / path.name).symlink_to(path)
        tmp.rename(folder)
    return folder


def layouts_patches(size: int, cache: Path = DATA_CACHE) -> Path:
    """The layouts set at ``size``: one image per tumor layout, default textures, the
    recommended patch settings (64 px patches at 32 px input)."""
    folder = cache / f"layouts-tumor-{size}"
    patches = folder / "patches"
    if patches.is_dir():
        return patches
    layouts = tumor_layouts(cache)
    source = folder / "data"
    if not source.is_dir():
        n_images = len(list_layouts(layouts))
        print(f"generating {n_images} layout images at {size} px into {source}", flush=True)
        generate_dataset(SynthConfig(seed=0, layouts=layouts, images=n_images, size=size), source)
    patchify(source, patches, PatchifyConfig(**RECOMMENDED_PATCHIFY, seed=0))
    return patches


def dataset_patches(dataset: str, cache: Path = DATA_CACHE) -> Path:
    if dataset == "synth" or dataset == "camelyon16":
        return build_patches(dataset, cache)
    if dataset == "layouts":
        return layouts_patches(LAYOUTS_SIZE, cache)
    patches = cache / dataset / "patches"
    if not patches.is_dir():
        print(f"patchifying {SHARED_DATA / dataset} into {patches}", flush=True)
        patchify(SHARED_DATA / dataset, patches, REAL_PATCHIFY[dataset])
    return patches


def tumor_share(patches: Path) -> float:
    return float(PatchSet.open(patches).table["label"].mean())


# ----------------------------------------------------------------------------- runs


NO_GLASS = ("none",)
"""Groups of a set whose training patches all hold the same tissue ratio (no glass: ocdc,
bcss): the classes alone. No tissue-size shortcut exists there, so these sets are the
control (AUROC, BCA, Dice of label vs box vs mask supervision on real tissue); robust
AUROC reduces to AUROC and WGA to the worst class's accuracy."""


def group_attributes(patches: Path) -> tuple[str, ...]:
    """``tissue_ratio`` at TAU, or the classes alone where the tissue ratio is constant."""
    table = PatchSet.open(patches).table
    tissue = table.loc[table["split"] == "train", "tissue_ratio"]
    return NO_GLASS if tissue.nunique() == 1 else ("tissue_ratio",)


def group_taus(attributes: tuple[str, ...]) -> list[float]:
    """TAU for the tissue ratio; none for the classes alone (``none`` has no thresholds)."""
    return [] if attributes == NO_GLASS else [TAU]


def grouped_split(patches: Path, attributes: tuple[str, ...]) -> GroupedSplit:
    """The training split with the dataset's groups (GERNE's beta draws need it)."""
    return train_data(patches, list(attributes), group_taus(attributes)).splits["train"]


@dataclass
class GroupsRunner(Runner):
    """Robustness's runner with the dataset's groups (the classes alone on a control)."""

    attributes: tuple[str, ...] = ("tissue_ratio",)

    def config(self, run: Path, tau: float, trial: Trial, seed: int, variant: str) -> TrainConfig:
        config = super().config(run, tau, trial, seed, variant)
        if self.attributes != NO_GLASS:
            return config
        taus = group_taus(self.attributes)
        return config.model_copy(update={"attributes": list(self.attributes), "taus": taus})


def feasible(method: str, split: GroupedSplit) -> str | None:
    """Why ``method`` cannot run on this training split (None when it can)."""
    cls = get_method(method)
    try:
        cls.check_hparams({k: h.default for k, h in cls.hparams.items()}, split)
    except UnshortcutError as error:
        return str(error)
    return None


def test_scores(run: Path) -> dict[str, Any]:
    """Test metrics at the checkpoint validation WGA selected (read after every choice)."""
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    return metrics["by_criterion"][CRITERION]["test"]


def val_scores(run: Path) -> dict[str, Any]:
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    return metrics["by_criterion"][CRITERION]["val"]


TUMOR_BANDS = (0.0, 0.05, 0.2, 1.0)
"""Bands of a tumor patch's tumor pixel share, to see where the ranking fails: the label
is "any tumor pixel", so a patch with a sliver of tumor at its border (a few pixels at
32 px input) is a tumor patch however little the map can see of it."""


def robust_auroc_by_tumor_share(run: Path, patches: Path) -> dict[str, dict[str, Any]]:
    """Test AUROC on the robust bins' rows with the tumor rows cut into TUMOR_BANDS (every
    non-tumor row of the robust bins kept in each): which tumor patches rank low.
    Plain AUROC (not weighted per image); the band's tumor row count beside it."""
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    names = config["groups"]["attribute_names"]
    predictions = pd.read_parquet(run / "predictions" / "test.parquet")
    share = PatchSet.open(patches).table.set_index("patch_id")["tumor_fraction"]
    fraction = predictions["patch_id"].map(share).to_numpy(float)
    bins = predictions["attribute"].map({name: i for i, name in enumerate(names)})
    labels = predictions["label"].to_numpy()
    robust = np.zeros(len(predictions), dtype=bool)
    for label, chosen in enumerate(config["robust_bins_by_class"]):
        robust |= (labels == label) & bins.isin(chosen).to_numpy()
    bands = {}
    for lo, hi in itertools.pairwise(TUMOR_BANDS):
        tumor = robust & (labels == 1) & (fraction >= lo) & ((fraction < hi) | (hi == 1.0))
        rows = tumor | (robust & (labels == 0))
        auroc = None
        if tumor.any() and (rows & ~tumor).any():
            auroc = float(roc_auc_score(labels[rows], predictions["score"].to_numpy()[rows]))
        bands[f"{lo:g}-{hi:g}"] = {"auroc": auroc, "tumor_patches": int(tumor.sum())}
    return bands


def summarize(
    dataset: str,
    trial: Trial,
    runs: list[Path],
    read: Any = test_scores,
    patches: Path | None = None,
) -> dict[str, Any]:
    """One row: every metric over the seed runs, Dice overall and per group."""
    done = finished(runs)
    scores = [read(run) for run in done]
    grouped = read is test_scores and patches is not None
    by_share = [robust_auroc_by_tumor_share(run, patches) for run in done] if grouped else []
    segmentation = [s.get("segmentation") or {} for s in scores]
    groups = sorted({g for s in segmentation for g in s.get("groups", {})})
    return {
        "dataset": dataset,
        "method": trial.method,
        "tau": TAU,
        "trial": trial.index,
        "hparams": dict(trial.hparams) | dict(trial.training),
        "seeds_finished": len(done),
        "seeds_run": len(runs),
        "runs": [str(run) for run in runs],
        **{key: mean_std([s.get(key) for s in scores]) for key in METRICS},
        **{key: mean_std([s.get(key) for s in segmentation]) for key in SEGMENTATION},
        "robust_auroc_by_tumor_share": {
            band: {
                "auroc": mean_std([b[band]["auroc"] for b in by_share]),
                "tumor_patches": by_share[0][band]["tumor_patches"],
            }
            for band in (by_share[0] if by_share else {})
        },
        "dice_by_group": {
            g: {
                key: mean_std([s["groups"][g].get(key) for s in segmentation if "groups" in s])
                for key in (*SEGMENTATION, "predicted_share")
            }
            for g in groups
        },
    }


def run_dataset(
    dataset: str, patches: Path, settings: Settings, work: Path, log: Any = print
) -> dict[str, Any]:
    """Every run of one dataset (reusing finished ones), then its rows."""
    attributes = group_attributes(patches)
    split = grouped_split(patches, attributes)
    methods = [*METHODS, *(COMPONENTS if dataset in SYNTHETIC else ())]
    skipped = {m: reason for m in methods if (reason := feasible(m, split)) is not None}
    methods = [m for m in methods if m not in skipped]
    for method, reason in skipped.items():
        log(f"{dataset}: {method} skipped: {reason}")
    aggregate = dataset in SYNTHETIC and "spatial-mask" in methods
    expected = len(methods) * (settings.trials + settings.seeds - 1)
    expected += (len(AGGREGATIONS) - 1) * settings.seeds if aggregate else 0
    runner = GroupsRunner(
        patches, work / dataset, settings, expected=expected, log=log, attributes=attributes
    )
    trials = {m: random_trials(m, settings.trials, train=split) for m in methods}
    folders = {m: [runner.run(TAU, t, seed=0) for t in trials[m]] for m in methods}
    best = select_best(finished([f for m in methods for f in folders[m]]))[KNOWN.name]
    chosen: list[tuple[Trial, list[Path]]] = []
    for method in methods:
        summary = best.get(method)
        if summary is None:
            log(f"{dataset}: {method}: no finished run to select")
            continue
        trial = trials[method][folders[method].index(summary.path)]
        chosen.append((trial, [runner.run(TAU, trial, seed) for seed in range(settings.seeds)]))
    aggregation_rows = []
    if aggregate:
        default = trials["spatial-mask"][0]
        for name in AGGREGATIONS:
            trial = replace(default, hparams=default.hparams | {"aggregation": name})
            variant = "" if name == default.hparams["aggregation"] else f"agg-{name}"
            runs = [runner.run(TAU, trial, seed, variant) for seed in range(settings.seeds)]
            aggregation_rows.append(
                summarize(dataset, trial, runs, read=val_scores) | {"aggregation": name}
            )
    # Every choice is made: only now are test values read.
    tissue = patches if attributes != NO_GLASS else None
    rows = [summarize(dataset, trial, runs, patches=tissue) for trial, runs in chosen]
    trained = [i["seconds"] for i in runner.runs.values() if i["seconds"] is not None]
    return {
        "patches": str(patches),
        "attributes": list(attributes),
        "counts": split_counts(patches),
        "tumor_share": tumor_share(patches),
        "skipped": skipped,
        "rows": rows,
        "aggregation": aggregation_rows,
        "runs_trained": len(trained),
        "runs_reused": len(runner.runs) - len(trained),
        "seconds_trained": float(np.sum(trained)) if trained else 0.0,
        "runs": [run_record(run, info) for run, info in runner.runs.items()],
    }


# ----------------------------------------------------------------------------- calibration


def calibrate_layouts(settings: Settings, work: Path, log: Any = print) -> list[dict[str, Any]]:
    """Tumor share of each candidate size, largest first, down to the first that reaches
    MIN_TUMOR_SHARE; ERM's validation figures there (defaults, seed 0): the set must let
    ERM learn the task before methods are compared on it."""
    records = []
    for size in LAYOUTS_CANDIDATES:
        patches = layouts_patches(size)
        record: dict[str, Any] = {"size": size, "counts": split_counts(patches)}
        record["tumor_share"] = tumor_share(patches)
        log(f"layouts at {size} px: {record['tumor_share']:.1%} tumor patches")
        if record["tumor_share"] >= MIN_TUMOR_SHARE:
            trial = random_trials("erm", 1)[0]
            run = work / "calibration" / f"layouts-{size}" / "erm"
            config = load_config(
                patches=patches, out=run, method="erm", taus=[TAU], seed=0,
                epochs=settings.epochs, batch_size=settings.batch_size, **trial.training,
                bootstrap=settings.bootstrap, num_threads=settings.threads,
            )  # fmt: skip
            if not (run / "metrics.json").is_file():
                train(config, overwrite=True, progress=False)
            record["erm_val"] = {k: val_scores(run).get(k) for k in METRICS}
            log(f"  ERM (validation): {json.dumps(record['erm_val'])}")
        records.append(record)
        if record["tumor_share"] >= MIN_TUMOR_SHARE:
            break
    return records


# ----------------------------------------------------------------------------- report


def _row(rows: list[dict[str, Any]], dataset: str, method: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["dataset"] == dataset and r["method"] == method), None)


def _gap(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    if a is None or b is None or a[key]["mean"] is None or b[key]["mean"] is None:
        return None
    return float(a[key]["mean"] - b[key]["mean"])


def floors(rows: list[dict[str, Any]]) -> str | None:
    """Mask vs label supervision on the default benchmark: robust AUROC (floor +0.10)
    and worst-group accuracy (floor +5 points)."""
    mask, erm = _row(rows, "synth", "spatial-mask"), _row(rows, "synth", "erm")
    auroc, wga = _gap(mask, erm, "robust_auroc"), _gap(mask, erm, "worst_group_accuracy")
    if auroc is None or wga is None:
        return None
    met = "met" if auroc >= 0.10 and wga >= 0.05 else "NOT met"
    return (
        f"synth, spatial-mask - erm: robust AUROC {auroc:+.3f} (floor +0.10, the seed paper "
        f"+0.36), worst-group accuracy {100 * wga:+.1f} points (floor +5): {met}"
    )


def adding_up(rows: list[dict[str, Any]]) -> list[str]:
    """Does a combination beat both its parts (test WGA and robust AUROC, means)?"""
    lines = []
    for dataset in SYNTHETIC:
        mask = _row(rows, dataset, "spatial-mask")
        for other in COMPONENTS:
            combined, alone = (
                _row(rows, dataset, f"spatial-mask+{other}"),
                _row(rows, dataset, other),
            )
            if mask is None or combined is None or alone is None:
                continue
            parts = []
            for key, label in (("worst_group_accuracy", "WGA"), ("robust_auroc", "robust AUROC")):
                a, b = _gap(combined, mask, key), _gap(combined, alone, key)
                if a is None or b is None:
                    continue
                verdict = "adds up" if a > 0 and b > 0 else "does not add up"
                parts.append(f"{label} {a:+.3f} vs spatial-mask, {b:+.3f} vs {other} ({verdict})")
            if parts:
                lines.append(f"{dataset}, spatial-mask+{other}: " + "; ".join(parts))
    return lines


MIN_RANKED = 20
"""Fewer tumor patches than this in validation or test and a set cannot rank methods (one
patch moves a class accuracy by over 5 points)."""


def _bands(rows: list[dict[str, Any]]) -> list[str]:
    return next(
        (
            list(r["robust_auroc_by_tumor_share"])
            for r in rows
            if r.get("robust_auroc_by_tumor_share")
        ),
        [],
    )


def markdown(result: dict[str, Any], context: dict[str, str]) -> str:
    s = result["settings"]
    lines = [
        "## Spatial supervision",
        "",
        "Patch labels (`erm`) vs the filled bounding box of the tumor pixels "
        "(`spatial-box`) vs the pixel mask (`spatial-mask`), and the mask with GERNE's "
        "batches and update or with group reweighting (docs/methods/spatial-mask.md). "
        f"Same backbone ({s['model']}, + the pixel decoder for the spatial methods), "
        f"{s['epochs']} epochs, batch size {s['batch_size']}; per method {s['trials']} "
        "random trials (`unshortcut.search`, trial 0 = defaults) on the synthetic sets, the "
        f"defaults alone on the real ones, the best by validation worst-group accuracy, then "
        f"{s['seeds']} seeds; tau {TAU}. Test values at the checkpoint validation WGA "
        "selected, mean ± std over seeds; Dice of the tumor map pooled over the test "
        "pixels (map and mask binarised at 0.5). Written by `python bench/spatial.py` "
        "from bench/results/spatial.json.",
        "",
    ]
    for dataset, entry in result["datasets"].items():
        counts = entry["counts"]
        lines += [
            f"**{dataset}** ({entry['built']}; tumor / all patches: "
            + ", ".join(f"{k} {c['tumor']} / {c['patches']}" for k, c in counts.items())
            + (
                "; groups: the classes alone, tissue ratio 1 on every training patch (no "
                "glass, no tissue shortcut: a control), so robust AUROC = AUROC and WGA = "
                "the worst class's accuracy"
                if entry["attributes"] == list(NO_GLASS)
                else ""
            )
            + ")"
            + (
                f". **Too few tumor patches to rank methods** (fewer than {MIN_RANKED} in "
                "validation or test): the rows show the pipeline runs on it, not which "
                "method is better"
                if min(counts["val"]["tumor"], counts["test"]["tumor"]) < MIN_RANKED
                else ""
            ),
            "",
            "| method | robust AUROC | AUROC | worst-group AUROC | WGA % | BCA % | Dice "
            "| selected trial |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in result["rows"] if r["dataset"] == dataset):
            seeds = "" if r["seeds_finished"] == r["seeds_run"] else " (some seeds diverged)"
            lines.append(
                f"| {r['method']}{seeds} | {format_stat(r['robust_auroc'])} | "
                f"{format_stat(r['auroc'])} | "
                f"{format_stat(r['worst_group_auroc'])} | "
                f"{format_stat(r['worst_group_accuracy'], 100, 1)} | "
                f"{format_stat(r['balanced_accuracy'], 100, 1)} | {format_stat(r['dice'])} | "
                f"{r['trial']}: {format_hparams(r['hparams'])} |"
            )
        for method, reason in entry["skipped"].items():
            lines.append(f"| {method} | not run: {reason} | | | | | | |")
        lines.append("")
    lines += [
        "Dice of the tumor map per tumor group (test; pooled Dice / mean Dice of the "
        "patches with tumor pixels):",
        "",
        "| data | method | group | Dice | mean patch Dice |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        for group, stats in r["dice_by_group"].items():
            if group.startswith("tumor") and stats["dice"]["mean"] is not None:
                lines.append(
                    f"| {r['dataset']} | {r['method']} | {group} | {format_stat(stats['dice'])} | "
                    f"{format_stat(stats['mean_patch_dice'])} |"
                )
    lines += [
        "",
        "Where the ranking fails: robust AUROC's tumor rows (the small-tissue bin) cut by "
        "their tumor pixel share, each band against every non-tumor row of the robust bins "
        "(test, plain AUROC, mean ± std over seeds; tumor patches per band in brackets):",
        "",
        "| data | method | "
        + " | ".join(f"tumor share {band}" for band in _bands(result["rows"]))
        + " |",
        "|---|---|" + "---|" * len(_bands(result["rows"])),
    ]
    for r in result["rows"]:
        bands = r["robust_auroc_by_tumor_share"]
        if bands:
            lines.append(
                f"| {r['dataset']} | {r['method']} | "
                + " | ".join(
                    f"{format_stat(b['auroc'])} ({b['tumor_patches']})" for b in bands.values()
                )
                + " |"
            )
    lines += [
        "",
        "Aggregation of the pixel map into the patch score (`spatial-mask`, default trial, "
        "**validation**, same seeds; the default, topk, was chosen by this table):",
        "",
        "| data | aggregation | robust AUROC | AUROC | WGA % | BCA % | Dice |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["aggregation"]:
        lines.append(
            f"| {r['dataset']} | {r['aggregation']} | {format_stat(r['robust_auroc'])} | "
            f"{format_stat(r['auroc'])} | {format_stat(r['worst_group_accuracy'], 100, 1)} | "
            f"{format_stat(r['balanced_accuracy'], 100, 1)} | {format_stat(r['dice'])} |"
        )
    lines.append("")
    if result["floors"]:
        lines += [f"Floors: {result['floors']}.", ""]
    if result["adding_up"]:
        lines += ["Do the combinations add up (test means, combination minus part)?", ""]
        lines += [f"- {line}" for line in result["adding_up"]]
        lines.append("")
    trained = sum(e["runs_trained"] for e in result["datasets"].values())
    reused = sum(e["runs_reused"] for e in result["datasets"].values())
    seconds = sum(e["seconds_trained"] for e in result["datasets"].values())
    lines += [
        f"Command: `{context['command']}`",
        "",
        f"Date: {context['date']}; machine: {context['machine']}; wall time "
        f"{context['wall']} ({trained} runs trained in {seconds / 60:.1f} min, "
        f"{reused} reused).",
        "",
    ]
    return "\n".join(lines)


CARD_HEADING = "## What our benchmark shows"


def card_section(method: str, result: dict[str, Any]) -> str:
    """A spatial method card's benchmark section: its rows beside ERM's."""
    rows = [r for r in result["rows"] if r["method"] == method]
    if not rows:
        return ""
    lines = [
        CARD_HEADING,
        "",
        "Written by `python bench/spatial.py` from `bench/results/spatial.json` (protocol "
        "in docs/benchmarks.md, section Spatial supervision). Test, mean ± std over seeds; "
        "trial and checkpoint chosen by validation worst-group accuracy.",
        "",
        "| data | tau | robust AUROC | worst-group accuracy % | balanced accuracy % | Dice "
        "| ERM robust AUROC | ERM worst-group accuracy % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        erm = _row(result["rows"], r["dataset"], "erm")
        lines.append(
            f"| {r['dataset']} | {r['tau']:g} | {format_stat(r['robust_auroc'])} | "
            f"{format_stat(r['worst_group_accuracy'], 100, 1)} | "
            f"{format_stat(r['balanced_accuracy'], 100, 1)} | {format_stat(r['dice'])} | "
            f"{format_stat(erm['robust_auroc']) if erm else 'n/a'} | "
            f"{format_stat(erm['worst_group_accuracy'], 100, 1) if erm else 'n/a'} |"
        )
    return "\n".join(lines) + "\n"


def built(dataset: str) -> str:
    """How each set was built, in words (for the docs)."""
    if dataset == "synth":
        return "default `unshortcut synth`, 64 px patches at 32 px"
    if dataset == "layouts":
        return (
            f"the 50 CAMELYON17 layouts with tumor painted at {LAYOUTS_SIZE} px, "
            "64 px patches at 32 px"
        )
    config = REAL_PATCHIFY[dataset]
    if config is None:
        return "real slide thumbnail, 32 px patches, region split"
    return f"real, {config.patch_size} px patches at {config.input_size} px, image split"


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--trials", type=int, default=2, help="random trials on the synthetic sets")
    p.add_argument("--real-trials", type=int, default=1, help="random trials on the real sets")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    p.add_argument("--calibrate-layouts", action="store_true")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "spatial")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--cards", type=Path, default=ROOT / "docs" / "methods")
    args = p.parse_args(argv)
    if min(args.trials, args.real_trials, args.seeds) < 1:
        p.error("--trials, --real-trials and --seeds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.monotonic()
    settings = Settings(
        taus=(TAU,),
        methods=METHODS,
        trials=args.trials,
        seeds=args.seeds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        bootstrap=args.bootstrap,
        threads=args.threads,
        val_unknown=False,
    )
    try:
        if args.calibrate_layouts:
            records = calibrate_layouts(settings, args.work)
            print(json.dumps(records, indent=2))
            return
        datasets = {}
        for dataset in args.datasets:
            trials = args.trials if dataset in SYNTHETIC else args.real_trials
            patches = dataset_patches(dataset)
            entry = run_dataset(dataset, patches, replace(settings, trials=trials), args.work)
            datasets[dataset] = {"built": built(dataset), "trials": trials, **entry}
    except UnshortcutError as error:
        sys.exit(f"error: {error}")
    rows = [row for entry in datasets.values() for row in entry.pop("rows")]
    aggregation = [row for entry in datasets.values() for row in entry.pop("aggregation")]
    wall = round(time.monotonic() - started)
    context = {
        "command": shlex.join(
            ["python", "bench/spatial.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "wall": f"{wall // 3600}:{wall // 60 % 60:02d}:{wall % 60:02d}",
    }
    result = {
        "settings": asdict(settings),
        "rows": rows,
        "aggregation": aggregation,
        "floors": floors(rows),
        "adding_up": adding_up(rows),
        "datasets": datasets,
        **context,
    }
    section = markdown(result, context)
    print(section)
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results / "spatial.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.doc, replace_section(args.doc.read_text(encoding="utf-8"), section))
    for method in SPATIAL:
        card = args.cards / f"{method}.md"
        text = card_section(method, result)
        if text and card.is_file():
            atomic_write_text(card, replace_section(card.read_text(encoding="utf-8"), text))
    print(f"wrote {args.results / 'spatial.json'}, the section of {args.doc} and the cards")


if __name__ == "__main__":
    main()
