"""Training throughput: the real patch-set loader against in-memory tensors.

Both variants run the same training loop (``unshortcut.train.train_epoch``) over the
same ERM batches with the same augmentation and model; they differ only in where a
batch comes from:

- loader: ``SplitData`` over the memory-mapped pixel store (sorted fancy-index read,
  normalisation, augmentation; optionally in the prefetch thread);
- memory: the whole training split normalised once into a tensor; a batch is a tensor
  index, then the same augmentation.

The patch set is written directly with numpy under ``bench/work/`` (ignored by git).
Rounds alternate the variants so that load on a shared machine hits them alike; the
table reports the median images/s. Floor: the loader costs < 10% (ratio >= 0.90).
Usage: ``python bench/train_throughput.py [--size 64] [--batch 64] [--n 2560] [--rounds 3]
[--threads T]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from unshortcut.config import TrainConfig
from unshortcut.data import Augmentation, SplitData
from unshortcut.methods import Batch, get_method
from unshortcut.tiling.patchset import write_patch_set
from unshortcut.train import LoopContext, train_epoch, training_data

FLOOR = 0.90
WORK = Path(__file__).resolve().parent / "work" / "train_throughput"


def random_patch_set(path: Path, n: int, size: int, channels: int = 3) -> Path:
    """Random uint8 patches; train = 80%, val/test 10% each, both classes and bins filled."""
    if (path / "manifest.json").is_file() and np.load(path / "pixels.npy", mmap_mode="r").shape == (
        n, channels, size, size
    ):  # fmt: skip
        return path
    rng = np.random.default_rng(0)
    label = rng.integers(2, size=n)
    split = np.where(
        np.arange(n) < 0.8 * n, "train", np.where(np.arange(n) < 0.9 * n, "val", "test")
    )
    pixels = rng.integers(0, 256, (n, channels, size, size), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    masks[label == 1, : size // 2] = 255
    table = pd.DataFrame(
        {
            "patch_id": [f"p{i}" for i in range(n)],
            "image_id": [f"i{i % 16}" for i in range(n)],
            "patient_id": [f"i{i % 16}" for i in range(n)],
            "split": split,
            "x": np.zeros(n, int),
            "y": np.zeros(n, int),
            "size": np.full(n, size),
            "level": np.zeros(n, int),
            "tumor_fraction": label * 0.5,
            "tissue_ratio": rng.uniform(0.05, 1.0, n),
            "label": label,
            "synthetic": np.ones(n, bool),
        }
    )
    write_patch_set(path, table, pixels, masks, {"generator": "bench/train_throughput.py"}, True)
    return path


class InMemory(SplitData):
    """The same split with every pixel already normalised in RAM."""

    def __init__(self, base: SplitData) -> None:
        self.__dict__.update(base.__dict__)
        every = np.arange(len(base))
        whole = base.load(every)
        self.x_all, self.mask_all = whole.x, whole.mask

    def load(
        self,
        index: np.ndarray,
        augmentation: Augmentation | None = None,
        generator: torch.Generator | None = None,
        with_masks: bool = True,
    ) -> Batch:
        t = torch.from_numpy(np.asarray(index, dtype=np.int64))
        x, mask = self.x_all[t], self.mask_all[t]
        if augmentation is not None:
            x, mask = augmentation(x, mask, generator)
        y, attribute = self._labels[t], self._attributes[t]
        group = y * self.split.n_attributes + attribute
        return Batch(x, y, attribute, group, t, self._bins[t], self._values[t], mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n", type=int, default=2560)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    patches = random_patch_set(WORK / f"patches-{args.n}-{args.size}", args.n, args.size)
    config = TrainConfig(
        patches=patches, out=WORK / "unused", batch_size=args.batch, model=args.model
    )
    device = torch.device(args.device)
    data = training_data(config, device)
    ctx = LoopContext(config, data, device)
    method = get_method("erm")(ctx)
    memory = InMemory(data.loaders["train"])
    loaders = {
        "loader (prefetch)": (data.loaders["train"], True),
        "loader (no prefetch)": (data.loaders["train"], False),
        "memory (prefetch)": (memory, True),
        "memory (no prefetch)": (memory, False),
    }
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    images = len(ctx.train)
    for round_ in range(args.rounds + 1):  # round 0 warms caches and kernels
        for name, (loader, prefetch) in loaders.items():
            model = ctx.new_model()
            optimizers = method.optimizers(model)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            train_epoch(
                model, method, loader, optimizers, epoch=round_, seed=0, stream=0,
                augmentation=ctx.augmentation, prefetch=prefetch,
            )  # fmt: skip
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_:
                rates[name].append(images / (time.perf_counter() - start))

    median = {name: statistics.median(values) for name, values in rates.items()}
    table = Table(
        title=f"Training throughput: {args.model}, {args.size} px, 3 channels, batch "
        f"{args.batch}, {images} images/epoch, {device.type}, torch threads "
        f"{torch.get_num_threads()}, median of {args.rounds} rounds"
    )
    for column in ("source", "images/s", "loader / memory"):
        table.add_column(column, justify="left" if column == "source" else "right")
    for mode in ("prefetch", "no prefetch"):
        loader, memory = median[f"loader ({mode})"], median[f"memory ({mode})"]
        table.add_row(f"loader ({mode})", f"{loader:.0f}", f"{loader / memory:.3f}")
        table.add_row(f"memory ({mode})", f"{memory:.0f}", "")
    Console().print(table)
    ratio = median["loader (prefetch)"] / median["memory (prefetch)"]
    verdict = "ok" if ratio >= FLOOR else "BELOW FLOOR"
    print(f"loader/memory with prefetch (the default) = {ratio:.3f} (floor {FLOOR}: {verdict})")


if __name__ == "__main__":
    main()
