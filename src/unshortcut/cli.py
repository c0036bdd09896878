"""The ``unshortcut`` command line: a thin typer layer over library functions.

Each command parses options, calls one library function and prints a summary. A
user's mistake (:class:`UnshortcutError`) becomes a one-line ``error:`` message and
exit code 2, never a traceback. Commands register with :func:`command`.
"""

from __future__ import annotations

import errno
import functools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from unshortcut import __version__
from unshortcut.errors import UnshortcutError
from unshortcut.io.annotation_classes import DEFAULT_EXCLUDE_CLASSES, DEFAULT_TUMOR_CLASSES

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
    name: str, on_interrupt: str | None = None, group: typer.Typer | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command (on ``group``, default the main app) that never ends in a
    traceback for a user's or a machine's problem.

    An :class:`UnshortcutError` and an ``OSError`` (read-only folder, disk full, ...)
    become one ``error:`` line and exit 2; warnings the library raised (``warnings.warn``)
    are printed as ``warning:`` lines. ``on_interrupt`` is what a person should know
    after a stop midway (what was kept, how to go on): printed after Ctrl-C (exit 130)
    and after a full disk.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                try:
                    return fn(*args, **kwargs)
                except UnshortcutError as error:
                    _fail(caught, str(error), 2)
                except OSError as error:
                    _fail(caught, os_error_message(error, on_interrupt), 2)
                except KeyboardInterrupt:
                    hint = f": {on_interrupt}" if on_interrupt else ""
                    _flush_warnings(caught)
                    error_console.print(f"[bold red]interrupted[/]{hint}", highlight=False)
                    raise typer.Exit(130) from None
                finally:
                    _flush_warnings(caught)

        return (group or app).command(name)(wrapper)

    return decorate


def _fail(caught: list[warnings.WarningMessage], message: str, code: int) -> None:
    """Warnings first, then the one error line, then the exit code."""
    _flush_warnings(caught)
    error_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code) from None


def _flush_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Print the warnings recorded so far (each text once) and forget them."""
    _print_warnings([str(w.message) for w in caught])
    caught.clear()


#: Errors that stop a command midway; the command's hint says what was kept.
_MIDWAY = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})


def os_error_message(error: OSError, kept: str | None = None) -> str:
    """One line for a file-system error: the file, what the system said, what to do."""
    where = error.filename if error.filename is not None else None
    text = error.strerror or str(error)
    if error.filename2 is not None:
        where = f"{error.filename} -> {error.filename2}"
    message = f"{where}: {text}" if where is not None else text
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        message += " (choose a folder you can write to, or fix its permissions)"
    elif error.errno in (errno.ENOSPC, errno.EDQUOT):
        message += " (free some space or choose another folder)"
    if error.errno in _MIDWAY and kept:
        message += f"; {kept}"
    return message


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


@command(
    "patchify",
    on_interrupt="the images tiled so far are kept in OUT.partial; the same command "
    "continues from there",
)
def patchify_command(
    data: Path = typer.Argument(
        ...,
        help="Dataset folder: images/, masks/ and/or annotations/ (QuPath GeoJSON, ASAP "
        "XML), optional tissue/ and metadata.csv.",
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
    workers: int = typer.Option(
        1,
        "--workers",
        help="Images tiled at once, each in its own process (memory per worker: a few bands "
        "of one image). The result does not depend on it.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    background: str = typer.Option(
        "auto",
        "--background",
        help="Which side of the tissue threshold is background: bright (brightfield, H&E), "
        "dark (fluorescence, multimodal), or auto (Otsu: from the image border; a fixed "
        "--tissue-threshold: bright when it is >= 0.5).",
    ),
    tumor_values: str | None = typer.Option(
        None,
        "--tumor-values",
        help="Read masks as label maps: these values (e.g. 2, or 3,4) are tumor. Every "
        "other non-zero value in a mask must be listed in --tissue-values.",
    ),
    tissue_values: str | None = typer.Option(
        None,
        "--tissue-values",
        help="Label-map values that are tissue (e.g. 1,2 for 0 glass, 1 tissue, 2 tumor): "
        "the label map then also serves as the tissue mask.",
    ),
    tumor_classes: str = typer.Option(
        ",".join(DEFAULT_TUMOR_CLASSES),
        "--tumor-classes",
        help="Annotation classes (QuPath) or groups (ASAP) that are tumor, comma-separated, "
        "case-insensitive; 'unclassified' for polygons without one.",
    ),
    exclude_classes: str = typer.Option(
        ",".join(DEFAULT_EXCLUDE_CLASSES),
        "--exclude-classes",
        help="Annotation classes or groups carved out of the tumor (CAMELYON16 _2).",
    ),
    missing_mask: str = typer.Option(
        "error",
        "--missing-mask",
        help="An image with no mask and no annotation: error, or negative (tumor-free; "
        "for negative slides that were never annotated).",
    ),
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
        background=background,
        tumor_values=_label_values(tumor_values, "--tumor-values"),
        tissue_values=_label_values(tissue_values, "--tissue-values"),
        tumor_classes=_names(tumor_classes),
        exclude_classes=_names(exclude_classes),
        missing_mask=missing_mask,
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=error_console, transient=True) as progress:
        images = progress.add_task("images", total=None)
        bands = progress.add_task("bands", total=None)

        def on_image(image_id: str, done: int, total: int, n_bands: int) -> Callable[[], None]:
            progress.update(images, completed=done, total=total)
            progress.update(bands, description=f"{image_id} bands", total=n_bands, completed=0)
            return lambda: progress.advance(bands)

        result = patchify(
            data, out, config, overwrite=overwrite, on_image=on_image, workers=workers
        )
    for problem in result.warnings:
        error_console.print(f"[bold yellow]warning:[/] {problem}", highlight=False)
    table = Table(title=f"patch set {result.path}")
    for name in ("split", "patches", "tumor", "non-tumor", "median tissue (tumor)",
                 "median tissue (non-tumor)"):  # fmt: skip
        table.add_column(name, justify="left" if name == "split" else "right")
    for row in summary_rows(result.table):
        table.add_row(*row)
    console.print(table)


def _label_values(text: str | None, option: str) -> tuple[int, ...] | None:
    """'1,2' -> (1, 2) for --tumor-values/--tissue-values; None stays None."""
    if text is None:
        return None
    try:
        values = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise UnshortcutError(f"{option}: give whole numbers like 2 or 1,2, got {text!r}") from None
    return values


def _names(text: str) -> tuple[str, ...]:
    """'Tumor, _0' -> ('Tumor', '_0'): annotation class names, blanks dropped."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


@command(
    "train",
    on_interrupt="every finished epoch is kept in the run's checkpoints/last.pt; "
    "`unshortcut train --resume --out RUN` continues from there",
)
def train_command(
    patches: Path | None = typer.Argument(
        None,
        help="Patch-set folder written by `unshortcut patchify` (with --resume: taken from "
        "the run's config.json).",
    ),
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
    method_attribute: list[str] | None = typer.Option(
        None,
        "--method-attribute",
        help="Attribute the method trains with, if not every --attribute (repeatable; same "
        "syntax; metrics and selection still use every --attribute).",
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed of everything random (default: 0)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Training epochs (default: 10)."),
    model: str | None = typer.Option(
        None, "--model", help="small_cnn, resnet18/34/50, or timm:<name> (default: small_cnn)."
    ),
    pretrained: str | None = typer.Option(
        None,
        "--pretrained",
        help="Start from pretrained weights: a checkpoint file (.pth/.safetensors, "
        "torchvision- or timm-style ResNet state dict), a hub name (hf-hub:org/repo), or "
        "imagenet (needs a reachable hub) (default: none).",
    ),
    hed_jitter: float | None = typer.Option(
        None,
        "--hed-jitter",
        help="HED stain augmentation strength (scale and shift of each stain; 0.05 light, "
        "0.2 strong); RGB brightfield (H&E) patch sets only (default: 0, off).",
    ),
    stain_normalization: str | None = typer.Option(
        None,
        "--stain-normalization",
        help="none, macenko or reinhard: map every patch onto the training split's stain "
        "(fitted on training patches, applied alike at validation, test, evaluate and "
        "predict); RGB brightfield only (default: none).",
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
    precision: str | None = typer.Option(
        None, "--precision", help="auto, fp32 or bf16 autocast (default: auto = bf16 on CUDA)."
    ),
    channels_last: str | None = typer.Option(
        None, "--channels-last", help="auto, on or off (default: auto = on CUDA)."
    ),
    tensorboard: bool | None = typer.Option(
        None, "--tensorboard", help="Also write TensorBoard event files to RUN/tensorboard."
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the run in --out from its last checkpoint, with its own settings "
        "(config.json); a larger --epochs extends it.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it holds files."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train a classifier with a (debiasing) method and report worst-group performance.

    Groups are the label crossed with attribute bins fitted on the training split; the
    checkpoint is chosen on validation data only and the test split is scored once.
    """
    from unshortcut import distributed
    from unshortcut.config import load_config, parse_hp
    from unshortcut.evaluate import metric_warnings, results_tables
    from unshortcut.runs import open_run, resume_config
    from unshortcut.train import train

    if resume and out is None:
        raise UnshortcutError("--resume: say which run to continue with --out RUN")
    if not resume and patches is None and config is None:
        raise UnshortcutError("PATCHES: give the patch set to train on")
    settings = (resume_config if resume else load_config)(
        config,
        patches=patches,
        out=out,
        method=method,
        attributes=attribute,
        taus=tau,
        method_attributes=method_attribute,
        seed=seed,
        epochs=epochs,
        model=model,
        pretrained=pretrained,
        hed_jitter=hed_jitter,
        stain_normalization=stain_normalization,
        lr=lr,
        batch_size=batch_size,
        hp=parse_hp(hp) if hp else None,
        select_by=select_by,
        device=device,
        precision=precision,
        channels_last=channels_last,
        tensorboard=tensorboard,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        run = train(settings, resume=resume, overwrite=overwrite, progress=not quiet)
    if not distributed.is_main():
        return  # under torchrun, rank 0 speaks for every rank
    metrics = open_run(run).metrics
    for table in results_tables(metrics, f"{settings.method} ({run})"):
        console.print(table)
    _print_warnings([str(w.message) for w in caught] + metric_warnings(metrics))


def _print_warnings(texts: list[str]) -> None:
    """Each warning once, after the results, where a person reads them."""
    for text in dict.fromkeys(texts):
        error_console.print(f"[yellow]warning:[/] {text}", highlight=False)


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
    from unshortcut.evaluate import evaluate_run, metric_warnings, results_tables

    folder, metrics = evaluate_run(
        run, patches, name=name, criterion=criterion, bootstrap=bootstrap, device=device
    )
    for table in results_tables(metrics, str(metrics["patches"])):
        console.print(table)
    _print_warnings(metric_warnings(metrics))
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
        [],
        "--attribute",
        "-a",
        help="Attribute to audit (repeatable; several also give train's intersectional groups). "
        "Syntax: 'tissue_ratio', 'tissue_ratio:0.3,0.6', 'tissue_ratio:q4', 'site', 'site:cat' "
        "[default: tissue_ratio and every metadata column].",
    ),
    tau: list[float] = typer.Option(
        [], "--tau", help="Threshold(s) binning bare numeric attributes (default 0.5)."
    ),
    run: Path | None = typer.Option(
        None, "--run", help="A run folder: add the model's error against each attribute."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Write audit.json, groups.csv, audit.html, audit.md and plots here."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
    bootstrap: int = typer.Option(
        1000, "--bootstrap", help="Image-level bootstrap resamples for the AUROC intervals."
    ),
    min_group_patches: int = typer.Option(
        30, "--min-group-patches", help="Patches a group needs to be measurable."
    ),
    min_group_images: int = typer.Option(
        3, "--min-group-images", help="Images a group needs to be measurable."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap and the kNN estimate."),
) -> None:
    """How strongly does each attribute alone predict the label, and what to do about it.

    Per attribute: AUROC of the attribute alone (image-bootstrap interval), mutual
    information, the label x bin table with the minority groups, threshold suggestions,
    and a verdict; with --run, the model's error rate against the attribute.
    """
    from unshortcut.audit import audit_patch_set
    from unshortcut.groups import parse_attribute_specs
    from unshortcut.report.audit_section import write_audit
    from unshortcut.report.console import audit_renderables
    from unshortcut.tiling.patchset import PatchSet

    if bootstrap < 0 or min_group_patches < 1 or min_group_images < 1:
        raise UnshortcutError(
            "--bootstrap must be >= 0, --min-group-patches and --min-group-images >= 1"
        )
    specs = parse_attribute_specs(attribute, tau) if attribute else None
    result = audit_patch_set(
        PatchSet.open(patches),
        specs,
        taus=tau,
        run=run,
        n_bootstrap=bootstrap,
        seed=seed,
        min_group_patches=min_group_patches,
        min_group_images=min_group_images,
    )
    for problem in result.warnings:
        error_console.print(f"[bold yellow]warning:[/] {problem}", highlight=False)
    console.print(audit_renderables(result, console.width))
    if out is not None:
        write_audit(result, out, overwrite)
        console.print(f"audit written to {out}")


@command("report")
def report_command(
    source: Path = typer.Argument(
        ..., help="A run folder, or a folder of runs (seeds, methods, a sweep) below it."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="HTML file to write [default: SOURCE/report.html]."
    ),
    bootstrap: int = typer.Option(
        1000, "--bootstrap", help="Image-level bootstrap resamples for the audit's intervals."
    ),
) -> None:
    """One self-contained HTML report (and a Markdown twin) of one run or a folder of runs.

    The shortcut audit, headline metrics with intervals, accuracy per group, what each
    selection criterion picks, training curves, error against the attribute, the
    selection protocol, the exact configuration and every warning.
    """
    from unshortcut.report.build import write_report

    if bootstrap < 0:
        raise UnshortcutError("--bootstrap must be >= 0")
    files = write_report(source, out, n_bootstrap=bootstrap)
    for problem in files.warnings:
        error_console.print(f"[bold yellow]warning:[/] {problem}", highlight=False)
    console.print(f"report written to {files.html} (Markdown: {files.markdown})")


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


@command(
    "sweep",
    on_interrupt="finished runs are kept and interrupted ones resume; the same command "
    "continues the sweep",
)
def sweep_command(
    config: Path = typer.Argument(..., help="Sweep file (TOML): datasets, methods, taus, seeds."),
    out: Path | None = typer.Option(None, "--out", help="Sweep folder [default: the file's out]."),
    launcher: str | None = typer.Option(
        None, "--launcher", help="local (processes) or ray [default: the file's]."
    ),
    workers: int | None = typer.Option(
        None, "--workers", help="Runs at once [default: the file's]."
    ),
    status: bool = typer.Option(
        False, "--status", help="Say where the sweep stands; train nothing."
    ),
) -> None:
    """Run a grid or random search of runs; relaunching skips finished runs and resumes
    interrupted ones. Hyperparameters are chosen on validation only; test numbers are read
    once every choice is made."""
    from rich.table import Table

    from unshortcut.sweep import load_sweep, run_sweep, sweep_status, write_results

    overrides: dict[str, Any] = {"out": out}
    sweep = load_sweep(config, **overrides)
    if launcher is not None or workers is not None:
        settings = sweep.launcher.model_copy(
            update={k: v for k, v in (("kind", launcher), ("workers", workers)) if v is not None}
        )
        sweep = sweep.model_copy(update={"launcher": settings})
    if status:
        console.print(f"sweep {sweep.name}: {sweep.out}", highlight=False)
        table = Table()  # the folder above it: a title wraps at the table's narrow width
        table.add_column("phase")
        table.add_column("runs", justify="right")
        for phase, counts in sweep_status(sweep).items():
            table.add_row(phase, ", ".join(f"{n} {what}" for what, n in sorted(counts.items())))
        console.print(table)
        return
    result = run_sweep(sweep, log=lambda line: error_console.print(line, highlight=False))
    table = Table(title=f"sweep {sweep.name}: test %, mean ± std over seeds (chosen on validation)")
    for name in ("data", "tau", "protocol", "method", "WGA", "BCA", "robust AUROC"):
        table.add_column(
            name, justify="left" if name in ("data", "protocol", "method") else "right"
        )
    for row in result.rows:
        cells = [
            "n/a"
            if row[k]["mean"] is None
            else f"{100 * row[k]['mean']:.1f} ± {100 * row[k]['std']:.1f}"
            for k in ("worst_group_accuracy", "balanced_accuracy", "robust_auroc")
        ]
        tau = "" if row["tau"] is None else f"{row['tau']:g}"
        table.add_row(row["dataset"], tau, row["protocol"], row["method"], *cells)
    console.print(table)
    console.print(f"results: {write_results(result)}")


@command("check")
def check_command(
    path: Path = typer.Argument(..., help="A patch set folder or a run folder."),
) -> None:
    """Read a patch set or a run folder completely and check it against its checksums.

    Exit 0 when intact, 1 when damaged or unfinished (each problem on one line), 2 when
    PATH is neither. Also names leftovers of killed runs beside it.
    """
    from unshortcut.integrity import check_folder

    result = check_folder(path)
    for note in result.notes:
        error_console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    for problem in result.problems:
        error_console.print(f"[bold red]damaged:[/] {problem}", highlight=False, soft_wrap=True)
    if not result.ok:
        raise typer.Exit(1)
    console.print(f"ok: {path} ({result.kind}) is intact", highlight=False)


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


@command(
    "train",
    group=generate_app,
    on_interrupt="every finished epoch of the generator is kept; the same command with "
    "--resume continues from there",
)
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


@command("predict")
def predict_command(
    run: Path = typer.Argument(..., help="Run folder written by `unshortcut train`."),
    images: list[Path] = typer.Argument(
        ..., help="Images to score: any format patchify reads (tiled TIFF, OpenSlide, PNG, ...)."
    ),
    out: Path = typer.Option(..., "--out", help="Folder for one sub-folder per image."),
    threshold: float = typer.Option(
        0.5, "--threshold", help="Tumor probability from which a patch is called Tumor."
    ),
    shaky_below: float = typer.Option(
        0.7,
        "--shaky-below",
        help="Patches whose worst group validation accuracy (any class, same attribute "
        "bin) is below this are marked shaky.",
    ),
    metadata: Path | None = typer.Option(
        None,
        "--metadata",
        help="CSV with image_id and the image-level attributes the run's groups use "
        "(one row per image).",
    ),
    min_tissue: float | None = typer.Option(
        None,
        "--min-tissue",
        help="Score patches with at least this tissue ratio (default: the run's patch set's).",
    ),
    criterion: str | None = typer.Option(
        None, "--criterion", help="Which selected checkpoint (default: the run's primary)."
    ),
    csv: bool = typer.Option(False, "--csv", help="Also write predictions.csv."),
    batch_size: int = typer.Option(256, "--batch-size", help="Patches per inference batch."),
    thumbnail_size: int = typer.Option(
        2048, "--thumbnail-size", help="Longest side of overlay.png and shaky.png in pixels."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing image folders."),
) -> None:
    """Tumor heat maps of whole images: per-patch probabilities, QuPath GeoJSON, overlays.

    Images are cut and their tissue detected as the run's patch set was; only tissue
    patches are scored, with bounded memory. Every patch also carries its group and
    that group's validation accuracy, shown as a second, shaky-ground layer.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from unshortcut.predict import PredictOptions, predict

    options = PredictOptions(
        threshold=threshold,
        shaky_below=shaky_below,
        csv=csv,
        batch_size=batch_size,
        thumbnail_side=thumbnail_size,
        min_tissue=min_tissue,
        criterion=criterion,
        device=device,
        metadata=metadata,
        overwrite=overwrite,
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=error_console, transient=True) as progress:
        tasks: dict[str, Any] = {}

        def on_progress(image_id: str, stage: str, done: int, total: int) -> None:
            key = f"{image_id} {stage}"
            if key not in tasks:
                tasks[key] = progress.add_task(key, total=total)
            progress.update(tasks[key], completed=done, total=total)

        results = predict(run, images, out, options, on_progress)
    for result in results:
        for problem in result.warnings:
            error_console.print(f"[bold yellow]warning:[/] {problem}", highlight=False)
        console.print(
            f"{result.image_id}: {result.scored} of {result.grid_patches} patches scored "
            f"({result.patches_per_second:.0f}/s), {result.tumor} tumor, {result.shaky} on "
            f"shaky ground -> {result.folder}",
            highlight=False,
        )
