"""Benchmark: `predict` on the 20,480 px benchmark slide, side by side with `patchify`.

The slide is bench/patchify.py's (generated once, cached under bench/work/: a tiled
512 px JPEG TIFF, RGB, tissue on glass with scanner noise). A run is trained once per
model on that slide's own patches (patch 256, input 64, the patchify benchmark's
settings; one epoch: the weights do not matter for speed). Each variant runs in its own
subprocess, ``--repeats`` times, so that its peak resident memory (``os.wait4`` of that
child) is its own:

  patchify          the library's ``patchify`` on the image and mask
  predict <model>   ``unshortcut.predict.predict`` on the image: decode pass, tissue
                    detection, scoring every tissue patch, table, GeoJSON, overlays

Speed is patches per second of the variant's own wall time (imports and the model
load excluded for predict, whose clock starts inside ``predict``): patches written for
patchify, patches scored for predict.

    python bench/predict.py [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from patchify import WORK, ensure_slide
from unshortcut.atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results" / "predict.json"
PATCH, INPUT = 256, 64
MODELS = ("small_cnn", "resnet18")


def trained_run(data: Path, model: str, threads: int) -> Path:
    """A run on the benchmark slide's own patches (one epoch; only its speed matters)."""
    from unshortcut.config import load_config
    from unshortcut.tiling.patchify import PatchifyConfig, patchify
    from unshortcut.train import train

    work = WORK / f"predict-{data.name}"
    patches = work / "patches"
    if not (patches / "manifest.json").is_file():
        config = PatchifyConfig(
            patch_size=PATCH, input_size=INPUT, split_unit="region", region_size=2 * PATCH
        )
        patchify(data, patches, config, overwrite=True)
    run = work / f"run-{model}"
    if not (run / "metrics.json").is_file():
        settings = load_config(
            None, patches=patches, out=run, model=model, epochs=1, num_threads=threads,
            bootstrap=0, device="cpu", attributes=["none"],
        )  # fmt: skip
        train(settings, overwrite=True, progress=False)
    return run


def run_patchify(data: Path, threads: int) -> dict[str, float]:
    from unshortcut.tiling.patchify import PatchifyConfig, patchify

    out = WORK / f"bench-out-{data.name}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = patchify(data, out, PatchifyConfig(patch_size=PATCH, input_size=INPUT),
                      overwrite=True)  # fmt: skip
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "patches": len(result.table)}


def run_predict(data: Path, threads: int, model: str) -> dict[str, float]:
    import torch

    from unshortcut.predict import PredictOptions, predict

    torch.set_num_threads(threads)
    run = WORK / f"predict-{data.name}" / f"run-{model}"
    out = WORK / f"bench-predict-{data.name}"
    shutil.rmtree(out, ignore_errors=True)
    options = PredictOptions(device="cpu", overwrite=True)
    (result,) = predict(run, [data / "images" / "slide.tif"], out, options)
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": result.seconds, "patches": result.scored}


def mean_std(values: list[float]) -> dict[str, object]:
    """Mean and sample std (ddof 1) with the values, as every bench/results file has them."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "values": values}


def machine() -> str:
    """Without importing torch: the parent stays small, because a child's peak RSS
    (``ru_maxrss``) starts from its parent's size at fork, which ``exec`` keeps."""
    return f"nproc {len(os.sched_getaffinity(0))}, CPU only, torch {version('torch')}"


def measure(variant: str, data: Path, threads: int) -> dict[str, float]:
    """One variant in a fresh subprocess: its numbers, CPU seconds and peak RSS (MB)."""
    command = [sys.executable, __file__, "--variant", variant, "--data", str(data),
               "--threads", str(threads)]  # fmt: skip
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"variant {variant} failed")
    numbers = json.loads(output.strip().splitlines()[-1])
    return {
        **numbers,
        "patches_per_second": numbers["patches"] / numbers["seconds"],
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=20480)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (predict)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        if args.variant == "prepare":
            for model in MODELS:
                trained_run(args.data, model, args.threads)
            return
        if args.variant == "patchify":
            numbers = run_patchify(args.data, args.threads)
        else:
            numbers = run_predict(args.data, args.threads, args.variant.split(" ", 1)[1])
        print(json.dumps(numbers))
        return
    data = ensure_slide(args.size, 512, 0)
    prepare = [sys.executable, __file__, "--variant", "prepare", "--data", str(data),
               "--threads", str(args.threads)]  # fmt: skip
    subprocess.run(prepare, check=True)  # training stays out of this process
    variants = ["patchify", *(f"predict {m}" for m in MODELS)]
    samples: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for _ in range(args.repeats):  # interleaved, so machine load hits every variant alike
        for variant in variants:
            samples[variant].append(measure(variant, data, args.threads))
    keys = ("seconds", "patches", "patches_per_second", "cpu_seconds", "peak_rss_mb")
    rows = [
        {"variant": v, **{k: mean_std([s[k] for s in samples[v]]) for k in keys}} for v in variants
    ]
    result = {
        "settings": {"size": args.size, "tile": 512, "patch_size": PATCH, "input_size": INPUT,
                     "repeats": args.repeats, "threads": args.threads},
        "rows": rows,
        "command": f"python bench/predict.py --repeats {args.repeats} --threads {args.threads}",
        "machine": machine(),
    }  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    atomic_write_text(RESULTS, json.dumps(result, indent=2) + "\n")
    print(f"image {args.size} x {args.size} x 3 uint8, tiled 512 JPEG TIFF; patch {PATCH}, "
          f"input {INPUT}; torch threads {args.threads}; {result['machine']}\n")  # fmt: skip
    print("| variant | seconds | patches | patches/s | CPU seconds (whole process) | "
          "peak RSS (MB) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        cells = [f"{row[k]['mean']:.1f} ± {row[k]['std']:.1f}" for k in ("seconds",)]
        cells += [f"{row['patches']['mean']:.0f}"]
        cells += [f"{row[k]['mean']:.0f} ± {row[k]['std']:.0f}"
                  for k in ("patches_per_second", "cpu_seconds", "peak_rss_mb")]  # fmt: skip
        print(f"| {row['variant']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
