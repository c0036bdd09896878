"""The whole pipeline on built-in synthetic data, small enough for a laptop CPU.

synth -> patchify -> audit (with its verdict) -> train ERM and GERNE -> a side-by-side
table -> an HTML report of both runs -> a tumor heat map of one held-out (test) image.
It is the first thing a new user runs, so it uses only public library functions, the
same ones the individual commands call, and leaves every intermediate folder for
inspection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from unshortcut.audit import audit_patch_set
from unshortcut.config import load_config
from unshortcut.groups import parse_attribute_specs
from unshortcut.predict import PredictOptions, predict
from unshortcut.report.audit_section import write_audit
from unshortcut.report.build import write_report
from unshortcut.synth.config import RECOMMENDED_PATCHIFY, make_config
from unshortcut.synth.generate import generate_dataset
from unshortcut.tiling.patchify import PatchifyConfig, patchify
from unshortcut.tiling.patchset import PatchSet
from unshortcut.train import train


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; the defaults finish in a few minutes on two CPU cores."""

    images: int = 32
    size: int = 2048
    epochs: int = 12
    tau: float = 0.5
    seed: int = 0
    methods: tuple[str, ...] = ("erm", "gerne")


def run_demo(out: Path, settings: DemoSettings, console: Console, overwrite: bool = False) -> Path:
    """Run every stage into ``out``; returns the path of the comparison summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data, patches = out / "data", out / "patches"
    console.rule("1/6 synth: multimodal images with tumor masks")
    generate_dataset(
        make_config(images=settings.images, size=settings.size, seed=settings.seed),
        data,
        overwrite=overwrite,
    )
    console.rule("2/6 patchify: labelled patches with tissue ratio")
    patchify(
        data,
        patches,
        PatchifyConfig(
            patch_size=RECOMMENDED_PATCHIFY["patch_size"],
            input_size=RECOMMENDED_PATCHIFY["input_size"],
            seed=settings.seed,
        ),
        overwrite=overwrite,
    )
    console.rule("3/6 audit: does tissue ratio alone predict the label?")
    patch_set = PatchSet.open(patches)
    specs = parse_attribute_specs(["tissue_ratio"], [settings.tau])
    audit = audit_patch_set(patch_set, specs)
    write_audit(audit, out / "audit", overwrite=overwrite)
    auroc = audit.attribute_auroc["tissue_ratio"]
    shown = ", ".join(f"{split} {value:.3f}" for split, value in auroc.items() if value is not None)
    console.print(f"tissue_ratio alone predicts the label with AUROC {shown}")
    console.print(f"verdict: {audit.verdict.text}", highlight=False)
    console.rule("4/6 train and evaluate: " + ", ".join(settings.methods))
    rows = {}
    for method in settings.methods:
        run = train(
            load_config(
                patches=patches,
                out=out / "runs" / method,
                method=method,
                taus=[settings.tau],
                epochs=settings.epochs,
                seed=settings.seed,
            ),
            overwrite=overwrite,
        )
        rows[method] = json.loads((run / "metrics.json").read_text())["test"]
    summary = out / "summary.json"
    summary.write_text(json.dumps(rows, indent=2))
    console.print(comparison_table(rows))
    console.rule("5/6 report: audit, results, curves and errors in one page")
    report = write_report(out / "runs", out / "report.html", n_bootstrap=200, seed=settings.seed)
    console.print(f"report: {report.html} (Markdown twin: {report.markdown})", highlight=False)
    console.rule("6/6 predict: a heat map of a held-out image")
    held_out = held_out_image(data, patch_set)
    method = settings.methods[-1]
    options = PredictOptions(overwrite=overwrite)
    result = predict(out / "runs" / method, [held_out], out / "heatmaps", options)[0]
    console.print(
        f"{method} on {held_out.name} (test split): {result.folder / 'overlay.png'}",
        highlight=False,
    )
    return summary


def held_out_image(data: Path, patch_set: PatchSet) -> Path:
    """The first test-split image: no run has seen its patches."""
    table = patch_set.table
    image_id = sorted(table.loc[table["split"] == "test", "image_id"].unique())[0]
    return next((data / "images").glob(f"{image_id}.*"))


def comparison_table(rows: dict[str, dict]) -> Table:
    """Test metrics per method (selected on validation worst-group accuracy), in %."""
    table = Table(title="Test split, checkpoint selected by validation worst-group accuracy")
    for column in ("method", "balanced acc.", "worst-group acc. [95% CI]", "robust AUROC"):
        table.add_column(column)
    for method, m in rows.items():
        ci = m["worst_group_accuracy_ci"]
        interval = "no interval" if ci is None else f"{100 * ci[0]:.1f}, {100 * ci[1]:.1f}"
        table.add_row(
            method,
            f"{100 * m['balanced_accuracy']:.1f}",
            f"{100 * m['worst_group_accuracy']:.1f} [{interval}]",
            "n/a" if m["robust_auroc"] is None else f"{100 * m['robust_auroc']:.1f}",
        )
    return table
