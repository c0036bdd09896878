"""GERNE step cost: training samples per second of ERM and the GERNE variants, side by side.

All variants train the same model at the same total batch size on random patches,
through the methods' own ``train_step`` (batch drawing included):

- erm: one shuffled batch, one forward, one backward;
- gerne: the default, the paper's update: a forward pass per batch (biased, less-biased),
  one backward of ``(1 + beta) L_lb - beta L_b``;
- gerne_joint: one forward over both batches concatenated, one backward (``bn=joint``);
- two_backward: the naive implementation, a forward and a backward per batch with the
  losses scaled by ``-beta`` and ``1 + beta`` (the same gradient as gerne).

Steps alternate between the variants (erm, gerne, ..., erm, ...) so that load on a shared
machine hits them alike. The steps are cut into blocks; each block gives every variant's
rate (batch size over its median step time in the block), and the table reports the
mean and spread over blocks of each rate and of its cost per sample relative to ERM.
Writes bench/results/step_cost.json (rows layout) and prints the table.

Usage: ``python bench/step_cost.py [--size 32] [--batch 64] [--steps 200] [--blocks 5]``;
on a GPU, the paper's setting: ``python bench/step_cost.py --device cuda --model resnet50
--size 224 --batch 128 --bf16 --channels-last`` (the table then names the GPU and each
variant's peak memory).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from common import stat, write_results
from unshortcut.methods import Batch, GroupedSplit, get_method
from unshortcut.models import build_model

FLOOR = 1.15  # GERNE may cost at most this many times ERM per sample
VARIANTS = ("erm", "gerne", "gerne_joint", "two_backward")
RESULTS = Path(__file__).resolve().parent / "results" / "step_cost.json"


def make_data(n: int, size: int, seed: int) -> tuple[GroupedSplit, torch.Tensor]:
    """Random 3-channel patches; the attribute agrees with the label 90% of the time."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(2, size=n)
    attributes = np.where(rng.uniform(size=n) < 0.9, labels, 1 - labels)
    split = GroupedSplit.from_attributes(labels, attributes, np.zeros(n).astype(str), 2, 2)
    return split, torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def batch_of(
    split: GroupedSplit, pixels: torch.Tensor, rows: np.ndarray, device: torch.device
) -> Batch:
    index = torch.as_tensor(rows)
    return Batch(
        pixels[index.to(pixels.device)],
        torch.as_tensor(split.labels[rows]).to(device),
        torch.as_tensor(split.attributes[rows]).to(device),
        torch.as_tensor(split.groups[rows]).to(device),
        index.to(device),
    )


def two_backward_step(model: torch.nn.Module, batch: Batch, beta: float) -> None:
    """Naive GERNE: separate forward/backward passes for the biased and less-biased halves."""
    half = len(batch.y) // 2
    for part, scale in ((slice(0, half), -beta), (slice(half, None), 1.0 + beta)):
        loss = torch.nn.functional.cross_entropy(model(batch.x[part]), batch.y[part])
        (scale * loss).backward()


def run_variant(name: str, args: argparse.Namespace) -> Callable[[], float]:
    """A closure running one training step of a variant; returns its duration in seconds."""
    device = torch.device(args.device)
    split, pixels = make_data(4096 if device.type == "cpu" else 1024, args.size, seed=0)
    pixels = pixels.to(device)
    torch.manual_seed(0)
    model = build_model(args.model, 3, 2, args.size).to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    ctx = SimpleNamespace(
        train=split,
        val=split,
        batch_size=args.batch,
        seed=0,
        device=device,
        pretrained=False,
        make_optimizer=lambda params, *_: torch.optim.SGD(params, lr=1e-3, momentum=0.9),
    )
    hp = {"gerne_joint": {"bn": "joint"}}.get(name, {})
    method = get_method("erm" if name == "erm" else "gerne")(
        ctx, **({} if name == "erm" else {"beta": args.beta} | hp)
    )
    optimizers = method.optimizers(model)
    rng = np.random.default_rng(1)

    def batches():
        while True:
            yield from method.epoch_batches(0, rng)

    stream = batches()

    def step() -> None:
        batch = batch_of(split, pixels, next(stream), device)
        if name == "two_backward":
            for optimizer in optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            two_backward_step(model, batch, args.beta)
            for optimizer in optimizers.values():
                optimizer.step()
        else:
            method.train_step(model, batch, optimizers)

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        timed()
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--size", type=int, default=32, help="input size in pixels")
    parser.add_argument("--batch", type=int, default=64, help="total batch size")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per variant")
    parser.add_argument("--blocks", type=int, default=5, help="blocks the steps are cut into")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    timers = {name: run_variant(name, args) for name in VARIANTS}
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    per_block = max(1, args.steps // args.blocks)
    for _ in range(args.blocks):
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(per_block):
            for name in VARIANTS:
                times[name].append(timers[name]())
        for name in VARIANTS:
            rates[name].append(args.batch / statistics.median(times[name]))

    rows = []
    for name in VARIANTS:
        cost = [erm / rate for erm, rate in zip(rates["erm"], rates[name], strict=True)]
        rows.append(
            {"variant": name, "samples_per_s": stat(rates[name]), "cost_vs_erm": stat(cost)}
        )
    where = gpu or f"CPU x{args.threads}"
    title = (
        f"GERNE step cost: {args.model}, {args.size} px, 3 channels, batch {args.batch}, "
        f"beta {args.beta:g}, {where}{', bf16' if args.bf16 else ''}"
        f"{', channels-last' if args.channels_last else ''}, {args.blocks} blocks of "
        f"{per_block} interleaved steps"
    )
    table = Table(title=title)
    for column in ("variant", "samples/s", "cost per sample vs ERM"):
        table.add_column(column, justify="right")
    for row in rows:
        rate, cost = row["samples_per_s"], row["cost_vs_erm"]
        table.add_row(
            row["variant"],
            f"{rate['mean']:.0f} ± {rate['std']:.0f}",
            f"{cost['mean']:.3f}x ± {cost['std']:.3f}",
        )
    console = Console(width=100)
    console.print(table)
    ratio = rows[1]["cost_vs_erm"]["mean"]
    verdict = "within" if ratio <= FLOOR else "ABOVE"
    console.print(f"GERNE / ERM cost per sample: {ratio:.3f} ({verdict} the {FLOOR}x floor)")
    write_results(
        args.results,
        rows,
        title=title,
        floor=FLOOR,
        device=gpu or "CPU",
        peak_memory_bytes=torch.cuda.max_memory_allocated(device) if gpu else None,
        torch=torch.__version__,
    )


if __name__ == "__main__":
    main()
