"""Draw docs/img/report.png: the top of `unshortcut report` for two quick real runs.

synth (defaults) -> patchify (64 px patches at 32 px) -> train erm and gerne for 3
epochs on the CPU -> report -> a screenshot of the page in headless Chromium. Stages
whose output exists in WORK are reused. Needs chromium on the PATH (`make browser`).

Usage: python bench/report_figure.py [OUT.png] [--work DIR] [--height PX]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

from unshortcut.config import load_config
from unshortcut.report.build import write_report
from unshortcut.synth import RECOMMENDED_PATCHIFY, generate_dataset, make_config
from unshortcut.tiling.patchify import PatchifyConfig, patchify
from unshortcut.train import train

METHODS = ("erm", "gerne")
WIDTH = 1200


def prepare_runs(work: Path) -> Path:
    """The two run folders under WORK/runs, made only where missing."""
    data, patches, runs = work / "data", work / "patches", work / "runs"
    if not data.exists():
        generate_dataset(make_config(), data)
    if not patches.exists():
        config = PatchifyConfig(
            patch_size=RECOMMENDED_PATCHIFY["patch_size"],
            input_size=RECOMMENDED_PATCHIFY["input_size"],
        )
        patchify(data, patches, config)
    for method in METHODS:
        if not (runs / method / "metrics.json").exists():
            config = load_config(
                patches=patches, out=runs / method, method=method, epochs=3, device="cpu"
            )
            train(config, overwrite=True)
    return runs


def screenshot(page: Path, out: Path, height: int) -> None:
    """The page's top ``height`` pixels at WIDTH, as a 256-colour PNG (small enough for git)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: run `make browser`")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "page.png"
        subprocess.run(
            [
                browser,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--window-size={WIDTH},{height}",
                f"--screenshot={raw}",
                page.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
        )
        image = Image.open(raw).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", nargs="?", default="docs/img/report.png", type=Path)
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "unshortcut-report-figure"
    )
    parser.add_argument("--height", type=int, default=1500)
    args = parser.parse_args()
    runs = prepare_runs(args.work)
    files = write_report(runs, args.work / "report.html")
    screenshot(files.html, args.out, args.height)
    print(f"wrote {args.out} from {files.html}")


if __name__ == "__main__":
    main()
