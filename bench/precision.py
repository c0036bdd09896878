"""Mixed precision and channels-last: training images/s of each variant, side by side.

For each model and input size, four variants train the same model on the same random
batches through ERM's ``train_step``: float32, float32 + channels-last, bf16 autocast,
bf16 autocast + channels-last. Steps alternate between the variants so that load on a
shared machine hits them alike; each block of steps gives every variant's rate (batch
size over its median step time), and the table reports mean and spread over blocks of
each rate relative to float32. ``--precision auto`` and ``--channels-last auto`` in
``unshortcut train`` follow what this measures: bf16 and channels-last on CUDA, off on
the CPU where they do not pay.

Writes bench/results/precision.json (rows layout). Usage: ``python bench/precision.py
[--device cpu] [--steps 60] [--blocks 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from common import stat, write_results
from unshortcut.models import build_model

RESULTS = Path(__file__).resolve().parent / "results" / "precision.json"
VARIANTS = {
    "fp32": (False, False),
    "fp32+channels_last": (False, True),
    "bf16": (True, False),
    "bf16+channels_last": (True, True),
}
SETTINGS = (("small_cnn", 32, 64), ("small_cnn", 64, 64), ("resnet18", 64, 32))


def variant_step(
    model_name: str, size: int, batch: int, bf16: bool, channels_last: bool, device: torch.device
) -> Callable[[], float]:
    torch.manual_seed(0)
    model = build_model(model_name, 3, 2, size).to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        )
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    per_block = max(1, args.steps // args.blocks)
    for model_name, size, batch in SETTINGS:
        steps = {
            name: variant_step(model_name, size, batch, bf16, cl, device)
            for name, (bf16, cl) in VARIANTS.items()
        }
        rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.blocks):
            times: dict[str, list[float]] = {name: [] for name in VARIANTS}
            for _ in range(per_block):
                for name, step in steps.items():
                    times[name].append(step())
            for name in VARIANTS:
                rates[name].append(batch / statistics.median(times[name]))
        for name in VARIANTS:
            ratio = [r / f for r, f in zip(rates[name], rates["fp32"], strict=True)]
            rows.append(
                {
                    "model": model_name,
                    "size": size,
                    "batch": batch,
                    "variant": name,
                    "images_per_s": stat(rates[name]),
                    "speed_vs_fp32": stat(ratio),
                }
            )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    title = (
        f"Training images/s by precision and memory format ({name}, torch threads "
        f"{torch.get_num_threads()}, {args.blocks} blocks of {per_block} interleaved steps)"
    )
    table = Table(title=title)
    for column in ("model", "px", "variant", "images/s", "speed vs fp32"):
        table.add_column(column, justify="right")
    for row in rows:
        rate, ratio = row["images_per_s"], row["speed_vs_fp32"]
        table.add_row(
            row["model"], str(row["size"]), row["variant"],
            f"{rate['mean']:.0f} ± {rate['std']:.0f}", f"{ratio['mean']:.2f}x ± {ratio['std']:.2f}",
        )  # fmt: skip
    Console(width=110).print(table)
    write_results(args.results, rows, title=title, device=name, torch=torch.__version__)


if __name__ == "__main__":
    main()
