"""MeDi generator on the default synthetic benchmark: cost and quality of the CPU configuration.

Trains the conditional diffusion generator (``--preset cpu``, one torch thread) on
the real training split of the default synthetic patch set (``unshortcut synth``,
64 px patches at 32 px), then, for each sampling seed, generates ``--count`` patches
per group (label x tissue_ratio >= 0.5) and reads the quality report written with
them. Reported: generator training seconds per epoch, sampling seconds per patch,
the judge's conditional accuracy on label and tissue bin (overall and per group,
with its accuracy on real validation patches as the reference), the Frechet
distance and the nearest-training-patch distance. Writes
``bench/results/medi_generator.json`` (metrics as {mean, std, values} over sampling
seeds) and ``docs/img/medi-grid.png``.

Usage: ``python bench/medi_generator.py [--patches P] [--epochs E] [--count N]
[--seeds S] [--threads T]``; the patch set is built under ``bench/work/`` when not given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from unshortcut.generate import augment_patch_set, load_generator_config, train_generator
from unshortcut.generate.quality import to_rgb
from unshortcut.generate.scaling import PixelScaling
from unshortcut.synth.config import RECOMMENDED_PATCHIFY, SynthConfig
from unshortcut.synth.generate import generate_dataset
from unshortcut.tiling.patchify import PatchifyConfig, patchify
from unshortcut.tiling.patchset import PatchSet

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work" / "medi_generator"
RESULT = ROOT / "results" / "medi_generator.json"
FIGURE = ROOT.parent / "docs" / "img" / "medi-grid.png"
FLOOR = 0.80


def synth_patches(folder: Path) -> Path:
    """The default synthetic benchmark's patch set, built once."""
    patches = folder / "patches"
    if not patches.is_dir():
        source = folder / "data"
        if not source.is_dir():
            generate_dataset(SynthConfig(seed=0), source)
        patchify(source, patches, PatchifyConfig(**RECOMMENDED_PATCHIFY, seed=0))
    return patches


def stats(values: list[float | None]) -> dict[str, Any]:
    kept = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(kept) if kept else None,
        "std": statistics.pstdev(kept) if len(kept) > 1 else 0.0,
        "values": values,
    }


def figure(sets: PatchSet, scaling: PixelScaling, quality: dict[str, Any], path: Path) -> None:
    """Per group, 8 generated patches above 8 real training patches."""
    from matplotlib.figure import Figure

    table = sets.table
    groups = list(quality["groups"])
    fig = Figure(figsize=(8, 2.3 * len(groups)))
    axes = fig.subplots(2 * len(groups), 8, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.97, bottom=0.01, wspace=0.05, hspace=0.3)
    tissue = table["tissue_ratio"].to_numpy() >= 0.5
    label = table["label"].to_numpy()
    synthetic = table["synthetic"].to_numpy()
    train = table["split"].to_numpy() == "train"
    for g, name in enumerate(groups):
        want_label = int(name.startswith("tumor"))
        want_tissue = ">=" in name
        match = (label == want_label) & (tissue == want_tissue) & train
        for r, rows in enumerate((np.flatnonzero(match & synthetic)[:8],
                                  np.flatnonzero(match & ~synthetic)[:8])):  # fmt: skip
            images = to_rgb(scaling.forward(sets.pixels[np.sort(rows)]))
            for c, ax in enumerate(axes[2 * g + r]):
                ax.set_axis_off()
                if c < len(images):
                    ax.imshow(images[c], interpolation="nearest")
            axes[2 * g + r][0].set_title(
                f"{name}: {'generated' if r == 0 else 'real'}", fontsize=8, loc="left"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patches", type=Path, default=None)
    p.add_argument("--epochs", type=int, default=None, help="default: the cpu preset's")
    p.add_argument("--count", type=int, default=64, help="patches per group and seed")
    p.add_argument("--seeds", type=int, default=3, help="sampling seeds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--tag", default="cpu", help="name of the run folder under --work")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    patches = args.patches or synth_patches(ROOT / "work" / "data" / "synth")
    run = args.work / f"generator-{args.tag}"
    config = load_generator_config(
        None, patches=patches, out=run, preset="cpu", epochs=args.epochs,
        num_threads=args.threads, device="cpu",
    )  # fmt: skip
    load_before = os.getloadavg()
    resume = (run / "config.json").is_file()
    train_generator(config, resume=resume, on_epoch_end=lambda line: print(line, flush=True))
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]

    per_seed: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        marks: dict[str, float] = {}

        def on_progress(stage: str, done: int, total: int, marks: dict[str, float] = marks) -> None:
            marks.setdefault(f"{stage}-start", time.perf_counter())
            if done == total:
                marks[f"{stage}-end"] = time.perf_counter()

        out = args.work / f"{args.tag}-samples-seed{seed}"
        result = augment_patch_set(
            run, out, count=args.count, seed=seed, device="cpu", overwrite=True,
            on_progress=on_progress,
        )  # fmt: skip
        n = sum(result.counts.values())
        seconds = marks["sample-end"] - marks["sample-start"]
        per_seed.append({"quality": result.quality, "sample_seconds_per_patch": seconds / n})
        print(f"seed {seed}: {n} patches, {seconds / n:.3f} s each", flush=True)
        if seed == 0:
            scaling = PixelScaling.from_dict(
                json.loads((run / "config.json").read_text())["scaling"]
            )
            figure(result.patchset, scaling, result.quality, FIGURE)

    groups = list(per_seed[0]["quality"]["groups"])
    overall = [s["quality"]["overall"] for s in per_seed]
    rows: list[dict[str, Any]] = [
        {
            "group": "all",
            "train_seconds_per_epoch": stats([h["seconds"] for h in history]),
            "sample_seconds_per_patch": stats([s["sample_seconds_per_patch"] for s in per_seed]),
            "label_accuracy": stats([o["conditional_accuracy"]["label"] for o in overall]),
            "tissue_bin_accuracy": stats(
                [o["conditional_accuracy"]["tissue_ratio"] for o in overall]
            ),
            "real_val_label_accuracy": stats([o["real_val_accuracy"]["label"] for o in overall]),
            "real_val_tissue_bin_accuracy": stats(
                [o["real_val_accuracy"]["tissue_ratio"] for o in overall]
            ),
            "nearest_train_median": stats(
                [o["nearest_train_distance"]["generated"]["median"] for o in overall]
            ),
            "real_val_nearest_train_median": stats(
                [o["nearest_train_distance"]["real_val"]["median"] for o in overall]
            ),
        }
    ]
    for name in groups:
        q = [s["quality"]["groups"][name] for s in per_seed]
        rows.append(
            {
                "group": name,
                "label_accuracy": stats([g["conditional_accuracy"]["label"] for g in q]),
                "tissue_bin_accuracy": stats(
                    [g["conditional_accuracy"]["tissue_ratio"] for g in q]
                ),
                "real_val_label_accuracy": stats([g["real_val_accuracy"]["label"] for g in q]),
                "real_val_tissue_bin_accuracy": stats(
                    [g["real_val_accuracy"]["tissue_ratio"] for g in q]
                ),
                "fid": stats([g["fid"] for g in q]),
                "real_val_fid": stats([g["fid_real_val_vs_train"] for g in q]),
                "generated_closer_than_val_p01": stats(
                    [g["nearest_train_distance"]["generated_closer_than_val_p01"] for g in q]
                ),
            }
        )
    result_json = {
        "settings": {
            "preset": "cpu",
            "epochs": config.epochs,
            "config": config.to_json_dict() | {"patches": str(patches), "out": _shown(run)},
            "count_per_group": args.count,
            "sampling_seeds": args.seeds,
            "threads": args.threads,
            "load_average_before_after": [load_before, os.getloadavg()],
            "cpus": os.cpu_count(),
            "train_seconds_total": sum(h["seconds"] for h in history),
            "floor": FLOOR,
        },
        "command": "python " + " ".join(sys.argv),
        "rows": rows,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result_json, indent=1) + "\n")
    print_table(rows)


def _shown(path: Path) -> str:
    """A path relative to the repository when it lies inside it."""
    try:
        return str(path.resolve().relative_to(ROOT.parent))
    except ValueError:
        return str(path)


def print_table(rows: list[dict[str, Any]]) -> None:
    def show(metric: dict[str, Any] | None) -> str:
        if not metric or metric["mean"] is None:
            return ""
        return f"{metric['mean']:.3f} ± {metric['std']:.3f}"

    table = Table(title="MeDi generator, cpu preset (generated vs real validation)")
    columns = ("group", "label acc", "real val", "tissue-bin acc", "real val", "FID", "real val")
    for name in columns:
        table.add_column(name, justify="left" if name == "group" else "right")
    for row in rows:
        table.add_row(
            row["group"],
            show(row.get("label_accuracy")),
            show(row.get("real_val_label_accuracy")),
            show(row.get("tissue_bin_accuracy")),
            show(row.get("real_val_tissue_bin_accuracy")),
            show(row.get("fid")),
            show(row.get("real_val_fid")),
        )
    console = Console()
    console.print(table)
    first = rows[0]
    console.print(
        f"training {show(first['train_seconds_per_epoch'])} s/epoch; sampling "
        f"{show(first['sample_seconds_per_patch'])} s/patch"
    )


if __name__ == "__main__":
    main()
