"""How cost grows with workers and ranks: patchify over 1 and N workers, training over 1 and
N data-parallel ranks (torchrun, gloo on the CPU), measured side by side.

- patchify: the same images (``unshortcut synth``, cached under bench/work/) into a patch
  set with ``--workers 1`` and ``--workers N``, alternated ``--rounds`` times; seconds and
  images/s, and the speed-up;
- training: one run of ERM (small_cnn_gn, so ranks equal one process exactly) for
  ``--epochs`` epochs in one process with N torch threads, and under ``torchrun
  --nproc_per_node N`` with one thread per rank; training images/s from the wall time
  of the epochs (validation included), and the speed-up.

Writes bench/results/scaling.json (rows layout) and prints the table; docs/scaling.md
quotes it. Usage: ``python bench/scaling.py [--workers 2] [--rounds 2] [--images 16]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common import stat, write_results
from unshortcut.synth import generate_dataset, make_config
from unshortcut.synth.config import RECOMMENDED_PATCHIFY
from unshortcut.tiling.patchify import PatchifyConfig, patchify
from unshortcut.tiling.patchset import PatchSet

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "scaling"
RESULTS = ROOT / "bench" / "results" / "scaling.json"


def patchify_rates(data: Path, workers: int, rounds: int) -> dict[int, list[float]]:
    """images/s of patchify at 1 and ``workers`` workers, alternated."""
    config = PatchifyConfig(**RECOMMENDED_PATCHIFY)
    n_images = len(list((data / "images").iterdir()))
    rates: dict[int, list[float]] = {1: [], workers: []}
    for _ in range(rounds):
        for count in rates:
            out = WORK / f"patches-{count}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            patchify(data, out, config, workers=count)
            rates[count].append(n_images / (time.perf_counter() - start))
    return rates


def training_rate(patches: Path, out: Path, ranks: int, epochs: int, cores: int) -> float:
    """Training images/s of an ERM run on ``cores`` cores: ``ranks`` ranks of one thread,
    or (ranks = 1) one process with ``cores`` threads."""
    shutil.rmtree(out, ignore_errors=True)
    file = out.with_suffix(".toml")
    threads = 1 if ranks > 1 else cores
    file.write_text(
        f'model = "small_cnn_gn"\ndevice = "cpu"\nbootstrap = 0\nnum_threads = {threads}\n'
        f"epochs = {epochs}\n",
        encoding="utf-8",
    )
    cli = ["-m", "unshortcut", "train", str(patches), "--out", str(out), "--config", str(file),
           "--quiet"]  # fmt: skip
    command = [sys.executable, *cli]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={ranks}", *cli]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    seconds = time.perf_counter() - start
    n_train = int((PatchSet.open(patches).table["split"] == "train").sum())
    return n_train * epochs / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="workers and ranks to compare")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    data = WORK / f"synth-{args.images}"
    if not data.is_dir():
        generate_dataset(make_config(images=args.images, seed=0), data)
    patch_rates = patchify_rates(data, args.workers, args.rounds)
    patches = WORK / f"patches-{args.workers}"
    train_rates: dict[int, list[float]] = {1: [], args.workers: []}
    for _ in range(args.rounds):
        for ranks in train_rates:
            train_rates[ranks].append(
                training_rate(patches, WORK / f"run-{ranks}", ranks, args.epochs, args.workers)
            )
    rows = []
    for stage, rates, unit in (("patchify", patch_rates, "images/s"),
                               ("train", train_rates, "training images/s")):  # fmt: skip
        base = rates[1]
        for count, values in rates.items():
            speedup = [v / b for v, b in zip(values, base, strict=True)]
            rows.append(
                {"stage": stage, "parallel": count, "unit": unit, "rate": stat(values),
                 "speedup": stat(speedup)}
            )  # fmt: skip
    title = (
        f"Scaling on {os.cpu_count()} CPU cores: patchify of {args.images} synthetic 2048 px "
        f"images (workers), ERM small_cnn_gn {args.epochs} epochs (torchrun ranks), "
        f"{args.rounds} alternated rounds"
    )
    table = Table(title=title)
    for column in ("stage", "workers / ranks", "rate", "speed-up vs 1"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            r["stage"], str(r["parallel"]), f"{r['rate']['mean']:.1f} {r['unit']}",
            f"{r['speedup']['mean']:.2f}x ± {r['speedup']['std']:.2f}",
        )  # fmt: skip
    Console(width=110).print(table)
    write_results(args.results, rows, title=title)


if __name__ == "__main__":
    main()
