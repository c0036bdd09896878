"""GERNE step cost: training samples per second of ERM, GERNE and a naive two-backward GERNE.

All three train the same small CNN at the same total batch size on random patches:

- erm: one shuffled batch of ``batch`` rows, one forward, one backward;
- gerne: the registered method (two class-balanced half batches, one forward over their
  concatenation, one backward of ``(1 + beta) L_lb - beta L_b``), batch drawing included;
- two_backward: the naive implementation of the same update, a forward and a backward
  per half batch with the losses scaled by ``-beta`` and ``1 + beta`` (same gradient
  without BatchNorm, or with frozen BatchNorm; with shared statistics it differs).

Steps alternate between the variants (erm, gerne, two_backward, erm, ...) so that load on
a shared machine hits them alike; each variant's rate is its batch size over its median
step time, which ignores steps slowed by other processes.

Usage: ``python bench/step_cost.py [--size 32] [--batch 64] [--steps 100]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch.nn import functional as F

from unshortcut.methods import Batch, GroupedSplit, get_method
from unshortcut.models import build_model

FLOOR = 1.15  # GERNE may cost at most this many times ERM per sample


def make_data(n: int, size: int, seed: int) -> tuple[GroupedSplit, torch.Tensor]:
    """Random 3-channel patches; the attribute agrees with the label 90% of the time."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(2, size=n)
    attributes = np.where(rng.uniform(size=n) < 0.9, labels, 1 - labels)
    split = GroupedSplit(labels, attributes, np.zeros(n).astype(str), 2, 2)
    return split, torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def batch_of(split: GroupedSplit, pixels: torch.Tensor, rows: np.ndarray) -> Batch:
    index = torch.as_tensor(rows)
    return Batch(
        pixels[index],
        torch.as_tensor(split.labels[rows]),
        torch.as_tensor(split.attributes[rows]),
        torch.as_tensor(split.groups[rows]),
        index,
    )


def two_backward_step(model: torch.nn.Module, batch: Batch, beta: float) -> None:
    """Naive GERNE: separate forward/backward passes for the biased and less-biased halves."""
    half = len(batch.y) // 2
    for part, scale in ((slice(0, half), -beta), (slice(half, None), 1.0 + beta)):
        loss = F.cross_entropy(model(batch.x[part]), batch.y[part])
        (scale * loss).backward()


def run_variant(name: str, args: argparse.Namespace) -> Callable[[], float]:
    """A closure running one training step of a variant; returns its duration in seconds."""
    split, pixels = make_data(4096, args.size, seed=0)
    ctx = SimpleNamespace(
        train=split, val=split, batch_size=args.batch, seed=0, device=torch.device("cpu")
    )
    method = get_method("erm" if name == "erm" else "gerne")(
        ctx, **({} if name == "erm" else {"beta": args.beta})
    )
    torch.manual_seed(0)
    model = build_model("small_cnn", 3, 2, args.size).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    rng = np.random.default_rng(1)

    def batches():
        while True:
            yield from method.epoch_batches(0, rng)

    stream = batches()

    def step() -> None:
        batch = batch_of(split, pixels, next(stream))
        optimizer.zero_grad(set_to_none=True)
        if name == "two_backward":
            two_backward_step(model, batch, args.beta)
        else:
            method.loss(model, batch).backward()
        optimizer.step()

    def timed() -> float:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        timed()
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="input size in pixels")
    parser.add_argument("--batch", type=int, default=64, help="total batch size")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    names = ("erm", "gerne", "two_backward")
    timers = {name: run_variant(name, args) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.steps):
        for name in names:
            times[name].append(timers[name]())
    median = {name: args.batch / statistics.median(values) for name, values in times.items()}

    table = Table(
        title=f"GERNE step cost: small_cnn, {args.size} px, 3 channels, batch {args.batch}, "
        f"CPU x{args.threads}, median of {args.steps} interleaved steps each"
    )
    for column in ("variant", "samples/s", "cost per sample vs ERM", "vs GERNE"):
        table.add_column(column, justify="right")
    for name in names:
        table.add_row(
            name,
            f"{median[name]:.0f}",
            f"{median['erm'] / median[name]:.3f}x",
            f"{median['gerne'] / median[name]:.3f}x",
        )
    console = Console()
    console.print(table)
    ratio = median["erm"] / median["gerne"]
    verdict = "within" if ratio <= FLOOR else "ABOVE"
    console.print(f"GERNE / ERM cost per sample: {ratio:.3f} ({verdict} the {FLOOR}x floor)")


if __name__ == "__main__":
    main()
