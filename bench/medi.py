"""MeDi on the default synthetic benchmark: ERM and GERNE with and without generated patches.

1. The generator of ``bench/medi_generator.py`` (CPU preset, trained on the benchmark's
   real training split; trained here when missing) samples patches for every training
   group until each holds as many as the largest one (``--balance largest``); the
   original set plus those rows is ``synth+medi``.
2. The sweep ``configs/medi.toml`` trains erm, gerne and resample on ``synth`` and on
   ``synth+medi`` with the same budget (each method's defaults, checkpoint chosen on
   validation worst-group accuracy, 3 seeds), at tau 0.5.
3. Rows for bench/results/medi.json: erm, erm+medi, gerne, gerne+medi, resample (plain
   resampling of the same groups, the honest baseline) and resample+medi, with test WGA
   and BCA over seeds, and the generation's conditional accuracies (label, tissue bin)
   over the sampling seeds of bench/results/medi_generator.json.

Usage: ``python bench/medi.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from common import write_results
from unshortcut.generate import augment_patch_set, load_generator_config, train_generator
from unshortcut.sweep import load_sweep, run_sweep
from unshortcut.sweep import write_results as write_sweep

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "medi.toml"
PATCHES = ROOT / "bench" / "work" / "data" / "synth" / "patches"
GENERATOR = ROOT / "bench" / "work" / "medi_generator" / "generator-cpu"
AUGMENTED = ROOT / "bench" / "work" / "medi" / "patches-medi"
GENERATOR_RESULTS = ROOT / "bench" / "results" / "medi_generator.json"
RESULTS = ROOT / "bench" / "results" / "medi.json"
NAMES = {"synth": "", "synth+medi": "+medi"}


def augmented() -> dict[str, Any]:
    """The synth+medi patch set (built once) and the counts generated per group."""
    if not (GENERATOR / "checkpoints").is_dir() or not (GENERATOR / "history.jsonl").is_file():
        config = load_generator_config(
            None, patches=PATCHES, out=GENERATOR, preset="cpu", num_threads=1, device="cpu"
        )
        train_generator(config, resume=(GENERATOR / "config.json").is_file())
    counts_file = AUGMENTED.parent / "counts.json"
    if not AUGMENTED.is_dir():
        result = augment_patch_set(
            GENERATOR, AUGMENTED, patches=PATCHES, policy="largest", seed=0, device="cpu"
        )
        counts_file.write_text(json.dumps(result.counts, indent=2), encoding="utf-8")
    return json.loads(counts_file.read_text(encoding="utf-8"))


def main() -> None:
    counts = augmented()
    sweep = run_sweep(load_sweep(CONFIG))
    write_sweep(sweep)
    quality = {r["group"]: r for r in json.loads(GENERATOR_RESULTS.read_text())["rows"]}["all"]
    rows = [
        {
            "method": f"{row['method']}{NAMES[row['dataset']]}",
            "dataset": row["dataset"],
            "tau": row["tau"],
            "hparams": row["hparams"],
            "worst_group_accuracy": row["worst_group_accuracy"],
            "balanced_accuracy": row["balanced_accuracy"],
            "robust_auroc": row["robust_auroc"],
        }
        for row in sweep.rows
    ]
    generation = {
        "label_accuracy": quality["label_accuracy"],
        "tissue_bin_accuracy": quality["tissue_bin_accuracy"],
    }
    for row in rows:
        if row["dataset"] == "synth+medi":
            row |= generation
    write_results(RESULTS, rows, generated_per_group=counts, sweep=str(sweep.config.out))
    table = Table(title="MeDi on synth, tau 0.5: test %, mean ± std over 3 seeds")
    for column in ("method", "WGA", "BCA", "robust AUROC"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(row["method"], *(
            f"{100 * row[k]['mean']:.1f} ± {100 * row[k]['std']:.1f}"
            for k in ("worst_group_accuracy", "balanced_accuracy", "robust_auroc")
        ))  # fmt: skip
    Console(width=100).print(table)
    print(f"generated per group: {counts}")


if __name__ == "__main__":
    main()
