"""The ``unshortcut`` command line: a thin typer layer over library functions.

Each command parses options, calls one library function and prints a summary. A
user's mistake (:class:`UnshortcutError`) becomes a one-line ``error:`` message and
exit code 2, never a traceback. Commands register with :func:`command`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from unshortcut import __version__
from unshortcut.errors import UnshortcutError

app = typer.Typer(
    name="unshortcut",
    help="Find and remove shortcut learning in patch-wise tumor classification.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
error_console = Console(stderr=True)


def command(
    name: str, group: typer.Typer | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command (on ``group``, default the main app) whose UnshortcutError
    becomes a one-line message and exit 2."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except UnshortcutError as error:
                error_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None

        return (group or app).command(name)(wrapper)

    return decorate


def _version(value: bool) -> None:
    if value:
        console.print(f"unshortcut {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Find and remove shortcut learning in patch-wise tumor classification."""


@command("patchify")
def patchify_command(
    data: Path = typer.Argument(
        ..., help="Dataset folder: images/, masks/, optional tissue/ and metadata.csv."
    ),
    out: Path = typer.Argument(..., help="Patch-set folder to create (must not exist)."),
    patch_size: int = typer.Option(
        256, "--patch-size", help="Patch side in pixels of --level (full resolution at level 0)."
    ),
    input_size: int = typer.Option(
        64, "--input-size", help="Side of the stored patch: pixels are area-averaged down to it."
    ),
    stride: int | None = typer.Option(
        None, "--stride", help="Step between patches in --level pixels [default: --patch-size]."
    ),
    level: int = typer.Option(
        0, "--level", help="Pyramid level to cut patches from (0 = full resolution)."
    ),
    min_tissue: float = typer.Option(
        0.05,
        "--min-tissue",
        help="Drop patches with a smaller tissue ratio. The default only drops glass: the "
        "shortcut lives in border patches with little tissue, so they are kept.",
    ),
    min_tumor_fraction: float | None = typer.Option(
        None,
        "--min-tumor-fraction",
        help="Label 1 when the tumor fraction is at least this [default: any tumor pixel].",
    ),
    tissue_method: str = typer.Option(
        "otsu",
        "--tissue-method",
        help="Tissue detection when there is no tissue/ mask: otsu or threshold.",
    ),
    tissue_threshold: float | None = typer.Option(
        None,
        "--tissue-threshold",
        help="Grey level in [0, 1] (channels scaled to their 1st-99th percentiles) "
        "separating glass from tissue, for --tissue-method threshold.",
    ),
    min_object_size: float = typer.Option(
        64.0,
        "--min-object-size",
        help="Tissue pieces and holes smaller than this many full-resolution pixels a side "
        "are removed/filled. Lower it for images that are themselves thumbnails.",
    ),
    split_unit: str = typer.Option(
        "patient",
        "--split-unit",
        help="What splits are drawn over: patient (image when no patient_id), image, or "
        "region (square blocks of one slide; for single-slide data). Ignored when "
        "metadata.csv has a split column.",
    ),
    region_size: int | None = typer.Option(
        None,
        "--region-size",
        help="Block side in full-resolution pixels for --split-unit region "
        "[default: 8 patch sides].",
    ),
    split_fractions: str = typer.Option(
        "0.6,0.2,0.2", "--split-fractions", help="train,val,test fractions of the split units."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the split draw."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    """Cut images and tumor masks into a labelled patch set (patches.parquet + pixel store).

    Every patch records its label (1 when it holds tumor), tumor fraction, tissue ratio,
    position and metadata; splits never put one patient in two splits.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from unshortcut.tiling.patchify import PatchifyConfig, patchify, summary_rows
    from unshortcut.tiling.splits import parse_fractions

    config = PatchifyConfig(
        patch_size=patch_size,
        input_size=input_size,
        stride=stride,
        level=level,
        min_tissue=min_tissue,
        min_tumor_fraction=min_tumor_fraction,
        tissue_method=tissue_method,
        tissue_threshold=tissue_threshold,
        min_object_size=min_object_size,
        split_unit=split_unit,
        region_size=region_size,
        split_fractions=parse_fractions(split_fractions),
        seed=seed,
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=error_console, transient=True) as progress:
        images = progress.add_task("images", total=None)
        bands = progress.add_task("bands", total=None)

        def on_image(image_id: str, done: int, total: int, n_bands: int) -> Callable[[], None]:
            progress.update(images, completed=done, total=total)
            progress.update(bands, description=f"{image_id} bands", total=n_bands, completed=0)
            return lambda: progress.advance(bands)

        result = patchify(data, out, config, overwrite=overwrite, on_image=on_image)
    for problem in result.warnings:
        error_console.print(f"[bold yellow]warning:[/] {problem}", highlight=False)
    table = Table(title=f"patch set {result.path}")
    for name in ("split", "patches", "tumor", "non-tumor", "median tissue (tumor)",
                 "median tissue (non-tumor)"):  # fmt: skip
        table.add_column(name, justify="left" if name == "split" else "right")
    for row in summary_rows(result.table):
        table.add_row(*row)
    console.print(table)


@command("train")
def train_command(
    patches: Path = typer.Argument(..., help="Patch-set folder written by `unshortcut patchify`."),
    out: Path | None = typer.Option(None, "--out", help="Run folder to write."),
    method: str | None = typer.Option(None, "--method", help="Training method (default: erm)."),
    attribute: list[str] | None = typer.Option(
        None,
        "--attribute",
        help="Attribute that defines groups (repeatable; e.g. tissue_ratio, "
        "tissue_ratio:0.3,0.6, site:cat) (default: tissue_ratio).",
    ),
    tau: list[float] | None = typer.Option(
        None, "--tau", help="Threshold(s) for bare attribute names (repeatable) (default: 0.5)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed of everything random (default: 0)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Training epochs (default: 10)."),
    model: str | None = typer.Option(
        None, "--model", help="small_cnn, resnet18/34/50, or timm:<name> (default: small_cnn)."
    ),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (default: 0.01)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Batch size (default: 64)."),
    hp: list[str] | None = typer.Option(
        None, "--hp", help="Method hyperparameter key=value (repeatable)."
    ),
    config: Path | None = typer.Option(
        None, "--config", help="TOML file with any TrainConfig field; flags win over it."
    ),
    select_by: list[str] | None = typer.Option(
        None,
        "--select-by",
        help="Validation criteria to keep checkpoints for, primary first (repeatable) "
        "(default: all, worst_group_accuracy first).",
    ),
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda (default: auto)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it holds files."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train a classifier with a (debiasing) method and report worst-group performance.

    Groups are the label crossed with attribute bins fitted on the training split; the
    checkpoint is chosen on validation data only and the test split is scored once.
    """
    import warnings

    from unshortcut.config import load_config, parse_hp
    from unshortcut.evaluate import open_run, results_tables
    from unshortcut.train import train

    settings = load_config(
        config,
        patches=patches,
        out=out,
        method=method,
        attributes=attribute,
        taus=tau,
        seed=seed,
        epochs=epochs,
        model=model,
        lr=lr,
        batch_size=batch_size,
        hp=parse_hp(hp) if hp else None,
        select_by=select_by,
        device=device,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        run = train(settings, resume=resume, overwrite=overwrite, progress=not quiet)
    for warning in caught:
        error_console.print(f"[yellow]warning:[/] {warning.message}", highlight=False)
    for table in results_tables(open_run(run).metrics, f"{settings.method} ({run})"):
        console.print(table)


@command("evaluate")
def evaluate_command(
    run: Path = typer.Argument(..., help="Run folder written by `unshortcut train`."),
    patches: Path | None = typer.Option(
        None, "--patches", help="Patch set to score (default: the run's own)."
    ),
    name: str | None = typer.Option(
        None, "--name", help="Name of RUN/evaluation/<name> (default: the patch set's folder name)."
    ),
    criterion: str | None = typer.Option(
        None, "--criterion", help="Which selected checkpoint (default: the run's primary)."
    ),
    bootstrap: int | None = typer.Option(
        None, "--bootstrap", help="Bootstrap resamples for the CIs (default: the run's)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """Score a run's selected checkpoint on the val/test splits of a patch set.

    The run's own group thresholds and training normalisation are applied, so the
    numbers compare with the run's metrics.json.
    """
    from unshortcut.evaluate import evaluate_run, results_tables

    folder, metrics = evaluate_run(
        run, patches, name=name, criterion=criterion, bootstrap=bootstrap, device=device
    )
    for table in results_tables(metrics, str(metrics["patches"])):
        console.print(table)
    console.print(f"written: {folder}")


@command("synth")
def synth(
    out: Path = typer.Argument(..., help="DATA folder to write (images/, masks/, metadata.csv)."),
    images: int = typer.Option(32, help="Number of images."),
    size: int = typer.Option(2048, help="Image side in pixels (longest side with --layouts)."),
    channels: int = typer.Option(3, help="Channels: CARS, TPEF, SHG, then mixtures (1-8)."),
    seed: int = typer.Option(0, help="Master seed; the same seed gives byte-identical files."),
    tumor_signal: float = typer.Option(
        2.0, help="Texture difference of tumor (nuclei, collagen): 0 none, 1 weak, 2 default."
    ),
    layouts: Path | None = typer.Option(
        None, help="Folder of grey layout PNGs (0 glass, 1 tissue, 2 tumor) to paint on."
    ),
    sites: int = typer.Option(2, help="Acquisition sites, each with its own intensity shift."),
    site_label_correlation: float = typer.Option(
        0.0, help="0: site independent of tumor; 1: tumor patients all at site 0."
    ),
    site_shift: float | None = typer.Option(None, help="Size of the per-site gain/offset shift."),
    images_per_patient: int | None = typer.Option(None, help="Images per patient."),
    dtype: str = typer.Option("uint8", help="Stored pixel type: uint8 or uint16."),
    compression: str = typer.Option("zlib", help="TIFF compression: zlib, zstd or none."),
    tumor_prevalence: float | None = typer.Option(None, help="Share of images that hold tumor."),
    tumor_area: float | None = typer.Option(None, help="Tumor share of tissue in tumor images."),
    tumor_size: float | None = typer.Option(None, help="Typical tumor nodule radius (pixels)."),
    tumor_edge_share: float | None = typer.Option(
        None, help="Share of nodules seeded at a tissue border (small-tissue tumor patches)."
    ),
    normal_hole_fraction: float | None = typer.Option(
        None, help="Gap share of lacy normal tissue (more: fewer tissue-rich normal patches)."
    ),
    dense_normal_share: float | None = typer.Option(
        None, help="Share of normal tissue that is dense (tissue-rich normal patches)."
    ),
    tumor_hole_fraction: float | None = typer.Option(None, help="Gap share inside tumor."),
    hole_scale: float | None = typer.Option(None, help="Size of fat-like gaps (pixels)."),
    section_scale: float | None = typer.Option(None, help="Tissue section radius / image side."),
    border_roughness: float | None = typer.Option(None, help="Irregularity of section borders."),
    nucleus_diameter: float | None = typer.Option(None, help="Normal nucleus diameter (pixels)."),
    write_tissue: bool = typer.Option(False, help="Also write ground-truth tissue/<id>.png."),
    write_split: bool = typer.Option(False, help="Add a patient-level split column."),
    workers: int = typer.Option(1, help="Images rendered in parallel processes."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
) -> None:
    """Write a synthetic multimodal microscopy DATA folder with a tissue-amount shortcut.

    Tumor patches end up tissue-rich and non-tumor patches include lacy and border
    ones, from geometry alone; tumor differs in texture by --tumor-signal. Made for
    `unshortcut patchify DATA OUT --patch-size 64 --input-size 32` (see synth.json).
    Knobs left unset keep the generator defaults (docs/synth.md, written to synth.json).
    """
    from unshortcut.synth import generate_dataset, make_config

    # Unset geometry/texture knobs keep the SynthConfig defaults (one source of truth).
    knobs = {
        "site_shift": site_shift,
        "images_per_patient": images_per_patient,
        "tumor_prevalence": tumor_prevalence,
        "tumor_area": tumor_area,
        "tumor_size": tumor_size,
        "tumor_edge_share": tumor_edge_share,
        "normal_hole_fraction": normal_hole_fraction,
        "dense_normal_share": dense_normal_share,
        "tumor_hole_fraction": tumor_hole_fraction,
        "hole_scale": hole_scale,
        "section_scale": section_scale,
        "border_roughness": border_roughness,
        "nucleus_diameter": nucleus_diameter,
    }
    config = make_config(
        **{name: value for name, value in knobs.items() if value is not None},
        images=images,
        size=size,
        channels=channels,
        seed=seed,
        tumor_signal=tumor_signal,
        layouts=layouts,
        sites=sites,
        site_label_correlation=site_label_correlation,
        dtype=dtype,
        compression=compression,
        write_tissue=write_tissue,
        write_split=write_split,
    )
    if workers < 1:
        raise UnshortcutError(f"--workers: must be at least 1, got {workers}")
    summary = generate_dataset(config, out, overwrite=overwrite, workers=workers)
    with_tumor = sum(1 for p in summary.plans if p.has_tumor)
    console.print(f"wrote {len(summary.plans)} images ({with_tumor} with tumor) to {out}")


@command("audit")
def audit_command(
    patches: Path = typer.Argument(..., help="Patch set folder written by `unshortcut patchify`."),
    attribute: list[str] = typer.Option(
        ["tissue_ratio"],
        "--attribute",
        "-a",
        help="Attribute to audit; repeat for several (intersectional groups). "
        "Syntax: 'tissue_ratio', 'tissue_ratio:0.3,0.6', 'tissue_ratio:q4', 'site'.",
    ),
    tau: list[float] = typer.Option(
        [], "--tau", help="Threshold(s) binning numeric attributes (default 0.5)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Write audit.json, groups.csv and a distribution plot here."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
) -> None:
    """How strongly does an attribute alone predict the label? Prints the group table."""
    from rich.table import Table

    from unshortcut.audit import audit_patch_set, write_audit
    from unshortcut.groups import parse_attribute_specs
    from unshortcut.tiling.patchset import PatchSet

    patch_set = PatchSet.open(patches)
    result = audit_patch_set(patch_set, parse_attribute_specs(attribute, tau))
    for column, by_split in result.attribute_auroc.items():
        shown = ", ".join(
            f"{split} {value:.3f}" if value is not None else f"{split} n/a"
            for split, value in by_split.items()
        )
        console.print(f"AUROC of [bold]{column}[/] alone for the label: {shown}")
    table = Table(title="Groups (label x attribute bins)")
    for name in result.group_table.columns:
        table.add_column(str(name))
    for row in result.group_table.itertuples(index=False):
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)
    if out is not None:
        write_audit(result, patch_set, out, overwrite)
        console.print(f"audit written to {out}")


@command("demo")
def demo_command(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Folder for every stage's output."),
    images: int = typer.Option(32, "--images", help="Synthetic images to generate."),
    epochs: int = typer.Option(12, "--epochs", help="Training epochs per method."),
    overwrite: bool = typer.Option(
        True, "--overwrite/--no-overwrite", help="Replace the output of an earlier demo."
    ),
) -> None:
    """Run the whole pipeline on built-in synthetic data: synth, patchify, audit, train."""
    from unshortcut.demo import DemoSettings, run_demo

    summary = run_demo(out, DemoSettings(images=images, epochs=epochs), console, overwrite)
    console.print(f"done: every stage's output is under {out} (summary: {summary})")


# --------------------------------------------------------------------------- generate (MeDi)

generate_app = typer.Typer(
    help="Conditional diffusion generator (MeDi): learn a patch set's training split, then "
    "write a new patch set with generated patches for the groups training lacks.",
    no_args_is_help=True,
)
app.add_typer(generate_app, name="generate")


def _generate_progress() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    return Progress(*columns, console=error_console)


@command("train", group=generate_app)
def generate_train_command(
    patches: Path = typer.Argument(..., help="Patch set whose real training patches to learn."),
    out: Path = typer.Option(..., "--out", help="Generator run folder to write."),
    preset: str | None = typer.Option(
        None, "--preset", help="cpu (narrow U-Net, minutes) or gpu (wide, hours) (default: cpu)."
    ),
    epochs: int | None = typer.Option(None, "--epochs", help="Training epochs (preset default)."),
    condition: list[str] | None = typer.Option(
        None,
        "--condition",
        help="Column to condition on besides the label (repeatable; col:cat / col:num force the "
        "kind) (default: tissue_ratio and every categorical metadata column).",
    ),
    with_mask: bool | None = typer.Option(
        None, "--with-mask/--no-mask", help="Generate the tumor mask too (default: on)."
    ),
    config: Path | None = typer.Option(
        None, "--config", help="TOML file with any GeneratorConfig field; flags win over it."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed of everything random (default 0)."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda (default auto)."),
    num_threads: int | None = typer.Option(None, "--num-threads", help="torch CPU threads."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it holds files."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train a conditional diffusion model on the real training patches of PATCHES.

    Conditioned on the label, the tissue ratio and categorical metadata (one embedding
    each, summed into the time embedding), with condition dropout for guidance.
    Checkpoints after every epoch; --resume continues a killed run exactly.
    """
    from contextlib import nullcontext

    from unshortcut.generate import load_generator_config, train_generator

    settings = load_generator_config(
        config,
        patches=patches,
        out=out,
        preset=preset,
        epochs=epochs,
        conditions=condition,
        with_mask=with_mask,
        seed=seed,
        device=device,
        num_threads=num_threads,
    )
    progress = nullcontext() if quiet else _generate_progress()
    with progress as bar:
        epochs_task = None if bar is None else bar.add_task("epochs", total=settings.epochs)
        steps_task = None if bar is None else bar.add_task("steps", total=None)

        def on_step(epoch: int, done: int, total: int) -> None:
            if bar is not None:
                bar.update(steps_task, description=f"epoch {epoch}", completed=done, total=total)

        def on_epoch_end(line: dict[str, Any]) -> None:
            if bar is not None:
                bar.update(epochs_task, completed=line["epoch"] + 1,
                           description=f"epochs (loss {line['loss']:.4f})")  # fmt: skip

        run = train_generator(
            settings, resume=resume, overwrite=overwrite, on_step=on_step, on_epoch_end=on_epoch_end
        )
    console.print(f"generator trained: {run}", soft_wrap=True, highlight=False)


@command("sample", group=generate_app)
def generate_sample_command(
    run: Path = typer.Argument(..., help="Generator run folder (`unshortcut generate train`)."),
    out: Path = typer.Option(..., "--out", help="New patch set to write (source + generated)."),
    groups: list[str] | None = typer.Option(
        None,
        "--groups",
        help="Group to generate for, named as `unshortcut train` prints it, e.g. "
        "'tumor|tissue_ratio<0.5' (repeatable) (default: all groups).",
    ),
    count: int | None = typer.Option(None, "--count", help="Patches to generate per group."),
    balance: str | None = typer.Option(
        None,
        "--balance",
        help="Instead of --count: largest (every group up to the largest), ratio:R (up to R x "
        "the largest) or count:N (up to N rows).",
    ),
    attribute: list[str] | None = typer.Option(
        None, "--attribute", help="Attribute(s) defining the groups, as in `unshortcut train`."
    ),
    tau: list[float] | None = typer.Option(None, "--tau", help="Threshold(s) (default 0.5)."),
    patches: Path | None = typer.Option(
        None, "--patches", help="Source patch set (default: the one the generator learned)."
    ),
    steps: int | None = typer.Option(None, "--steps", help="DDIM steps (default: the run's)."),
    guidance: float | None = typer.Option(
        None, "--guidance", help="Guidance scale: 0 unconditional, 1 conditional, >1 stronger."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the condition draws and the noise."),
    patches_per_image: int = typer.Option(
        64, "--patches-per-image", help="Generated patches per synthetic image id."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Sample patches for chosen groups and write them, with quality checks, as a new patch set.

    The new set is the source set unchanged plus the generated rows (split train,
    synthetic true); OUT/quality/ holds quality.json and a picture grid per group.
    """
    from contextlib import nullcontext

    from rich.table import Table

    from unshortcut.generate import augment_patch_set

    progress = nullcontext() if quiet else _generate_progress()
    with progress as bar:
        tasks: dict[str, Any] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if bar is None:
                return
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        result = augment_patch_set(
            run,
            out,
            patches=patches,
            count=count,
            policy=balance,
            groups=groups,
            attributes=attribute or (),
            taus=tau or (),
            seed=seed,
            steps=steps,
            guidance_scale=guidance,
            patches_per_image=patches_per_image,
            device=device,
            overwrite=overwrite,
            on_progress=on_progress,
        )
    table = Table(title=f"generated patches ({result.patchset.path})")
    for name in ("group", "generated", "judge agrees (real val)", "FID (real val)",
                 "nearest train (real val)"):  # fmt: skip
        table.add_column(name, justify="left" if name == "group" else "right")

    def pair(value: Any, reference: Any) -> str:
        shown = lambda v: "n/a" if v is None else f"{v:.3g}"  # noqa: E731
        return f"{shown(value)} ({shown(reference)})"

    for name, group in result.quality["groups"].items():
        nearest = group["nearest_train_distance"]
        table.add_row(
            name,
            str(group["n_generated"]),
            pair(group["conditional_accuracy"]["all"], group["real_val_accuracy"]["all"]),
            pair(group["fid"], group["fid_real_val_vs_train"]),
            pair(nearest["generated"]["median"], (nearest["real_val"] or {}).get("median")),
        )
    console.print(table)
    report = result.patchset.path / "quality" / "quality.json"
    console.print(f"quality report: {report}", soft_wrap=True, highlight=False)
