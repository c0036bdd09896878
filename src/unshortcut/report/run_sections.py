"""The report's sections about trained runs: results, groups, selection, curves, errors.

Every number is read from the run folders (metrics.json, history.jsonl, predictions)
and every table shows validation before test. Validation is what checkpoints were
chosen on; test numbers are shown for reading, and nothing in the report is ranked,
marked or chosen by them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from unshortcut.audit.model_errors import MIN_ERROR_BIN, ErrorCurve, predictions_error_curve
from unshortcut.report.audit_section import error_figure
from unshortcut.report.document import Block, Bullets, Code, Figure, Paragraph, Section, Table
from unshortcut.report.formatting import MISSING, pct
from unshortcut.report.plots import group_accuracy_png, training_curves_png
from unshortcut.report.settings import Setting

SPLITS = ("val", "test")
HEADLINE = (
    ("worst-group accuracy", "worst_group_accuracy"),
    ("balanced accuracy", "balanced_accuracy"),
    ("AUROC", "auroc"),
    ("robust AUROC", "robust_auroc"),
)
SPLIT_NAMES = {"val": "validation", "test": "test"}
TEST_NOTE = (
    "Test numbers are reported once, at the checkpoint chosen on validation; nothing in "
    "this report is chosen, ranked or marked by them."
)


def _runs_cell(setting: Setting) -> str:
    seeds = ", ".join(MISSING if s is None else str(s) for s in setting.seeds)
    return f"{len(setting.runs)} (seed {seeds})"


def results_section(settings: Sequence[Setting]) -> Section:
    """Headline metrics per setting: validation (the basis of selection), then test."""
    several = any(len(s.runs) > 1 for s in settings)
    how = (
        "mean ± standard deviation over seeds for settings with several runs; a single run "
        "shows its value with a 95% image-bootstrap interval"
        if several
        else "value [95% image-bootstrap interval]"
    )
    blocks: list[Block] = []
    for split in SPLITS:
        rows = tuple(
            (s.label, _runs_cell(s), *(s.summary(split, key) for _, key in HEADLINE))
            for s in settings
        )
        caption = f"{SPLIT_NAMES[split]} split, % ({how})"
        blocks.append(
            Table(
                ("setting", "runs", *(n for n, _ in HEADLINE)),
                rows,
                caption,
                numeric=(False, False, True, True, True, True),
            )
        )
    blocks.append(Paragraph(TEST_NOTE))
    return Section("Results", blocks)


def _group_names(settings: Sequence[Setting]) -> list[str]:
    names: list[str] = []
    for setting in settings:
        for run in setting.runs:
            for name in run.metrics.get("group_names", []):
                if name not in names:
                    names.append(name)
    return names


def _group_accuracy(setting: Setting, split: str, group: str) -> float | None:
    values = [
        run.metrics.get(split, {}).get("groups", {}).get(group, {}).get("accuracy")
        for run in setting.runs
    ]
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _group_n(setting: Setting, split: str, group: str) -> str:
    n = setting.runs[0].metrics.get(split, {}).get("groups", {}).get(group, {}).get("n")
    return MISSING if n is None else str(n)


def groups_section(settings: Sequence[Setting]) -> Section:
    """Accuracy per group and setting (mean over seeds), as a table and as bars."""
    groups = _group_names(settings)
    columns = ["group", *(f"{s} n" for s in SPLITS)]
    for setting in settings:
        columns += [f"{setting.label} {split}" for split in SPLITS]
    rows = []
    for group in groups:
        cells = [group, *(_group_n(settings[0], s, group) for s in SPLITS)]
        for setting in settings:
            cells += [pct(_group_accuracy(setting, split, group)) for split in SPLITS]
        rows.append(tuple(cells))
    caption = "Accuracy per group, % (mean over seeds); n = patches of the group in the split"
    panels = {
        SPLIT_NAMES[split]: {
            s.label: [_group_accuracy(s, split, g) for g in groups] for s in settings
        }
        for split in SPLITS
    }
    figure = Figure(
        group_accuracy_png(groups, panels), "Accuracy per group and setting", "group-accuracy"
    )
    return Section("Accuracy per group", [Table(tuple(columns), tuple(rows), caption), figure])


def _criteria(setting: Setting) -> list[str]:
    first = setting.runs[0]
    return list(
        first.config.get("select_by") or first.metrics.get("selection", {}).get("by_criterion", {})
    )


def selection_section(settings: Sequence[Setting]) -> Section:
    """What each kept selection criterion picked, and what it gives on validation and test."""
    blocks: list[Block] = [
        Paragraph(
            "Each row is the checkpoint a validation criterion picks. The primary criterion's "
            "checkpoint is the run's result; the others are kept for comparison. " + TEST_NOTE
        )
    ]
    for setting in settings:
        primary = setting.runs[0].criterion
        rows = []
        for criterion in _criteria(setting):
            epochs = [
                run.metrics.get("selection", {}).get("by_criterion", {}).get(criterion)
                for run in setting.runs
            ]
            rows.append(
                (
                    criterion + (" (primary)" if criterion == primary else ""),
                    ", ".join(MISSING if e is None else str(e) for e in epochs),
                    setting.summary("val", "worst_group_accuracy", criterion),
                    setting.summary("val", "balanced_accuracy", criterion),
                    setting.summary("test", "worst_group_accuracy", criterion),
                    setting.summary("test", "balanced_accuracy", criterion),
                )
            )
        columns = ("criterion (validation)", "epoch", "val WGA", "val BCA", "test WGA", "test BCA")
        blocks.append(Table(columns, tuple(rows), f"{setting.label}, %"))
    return Section("Selection criteria", blocks)


def protocol_section(settings: Sequence[Setting]) -> Section:
    """How checkpoints were chosen and how the numbers were made, per setting."""
    items = []
    for setting in settings:
        run, config = setting.runs[0], setting.config
        selection = run.metrics.get("selection", {})
        epochs = [r.metrics.get("selection", {}).get("epoch") for r in setting.runs]
        val_rows = run.metrics.get("val_rows_scored")
        scored = f" on {val_rows} validation patches" if val_rows is not None else ""
        bootstrap = run.metrics.get("val", {}).get("bootstrap", {})
        items.append(
            f"{setting.label}: checkpoint chosen by validation "
            f"{selection.get('criterion', MISSING)}{scored} "
            f"(epoch {', '.join(str(e) for e in epochs)}, counting from 0, of "
            f"{config.get('epochs', MISSING)}); "
            f"groups {', '.join(config.get('attributes', []) or ['none'])}"
            f"{' at tau ' + ', '.join(map(str, config['taus'])) if config.get('taus') else ''}; "
            f"intervals from {bootstrap.get('replicates', MISSING)} bootstrap resamples of "
            f"{bootstrap.get('unit', 'image')}s; the test split was scored once per kept "
            "checkpoint after training ended."
        )
    return Section(
        "Selection protocol", [Bullets(tuple(items)), Paragraph(TEST_NOTE, emphasis=True)]
    )


def curves_section(settings: Sequence[Setting]) -> Section:
    """Training loss and validation metrics per epoch from history.jsonl."""
    runs = []
    for colour, setting in enumerate(settings):
        for run in setting.runs:
            history = run.history()
            if history:
                runs.append(
                    (setting.label, colour, history, run.metrics.get("selection", {}).get("epoch"))
                )
    if not runs:
        return Section("Training curves", [Paragraph("No run has a history.jsonl.")])
    caption = "Per epoch; rings mark the epoch each run's primary criterion chose (validation)"
    return Section(
        "Training curves", [Figure(training_curves_png(runs), caption, "training-curves")]
    )


def _categorical(config: dict[str, Any], column: str) -> bool:
    for attribute in config.get("groups", {}).get("attributes", []):
        if attribute.get("column") == column:
            return bool(attribute.get("categories"))
    return False


def error_section(
    settings: Sequence[Setting], table: pd.DataFrame, columns: Sequence[str]
) -> Section:
    """Error rate against each grouping attribute, per setting (seeds pooled), val and test."""
    blocks: list[Block] = []
    for column in columns:
        categorical = _categorical(settings[0].config, column)
        for split in SPLITS:
            curves: dict[str, ErrorCurve] = {}
            for setting in settings:
                parts = [
                    p for p in (run.predictions(split) for run in setting.runs) if p is not None
                ]
                if parts:
                    source = f"{setting.runs[0].path}/predictions/{split}.parquet"
                    curves[setting.label] = predictions_error_curve(
                        categorical, column, table, pd.concat(parts), source
                    )
            if not curves:
                continue
            caption = (
                f"Error rate against {column}, {SPLIT_NAMES[split]} split (seeds pooled; bins "
                f"with fewer than {MIN_ERROR_BIN} patches left out)"
            )
            blocks.append(error_figure(column, curves, caption, f"error-{column}-{split}"))
    if not blocks:
        blocks.append(Paragraph("No predictions to plot (no run has predictions/)."))
    return Section("Error against the attribute", blocks)


def config_section(settings: Sequence[Setting]) -> Section:
    """The exact resolved configuration of each setting, and its run folders."""
    blocks: list[Block] = []
    for setting in settings:
        folders = ", ".join(str(run.path) for run in setting.runs)
        blocks.append(Paragraph(f"{setting.label}: {folders}"))
        text = json.dumps(setting.config, indent=2, sort_keys=False)
        blocks.append(Code(text, f"config.json of {setting.runs[0].path}"))
    return Section("Configuration", blocks)


def run_warnings(settings: Sequence[Setting]) -> list[str]:
    """Every warning the runs' metrics carry, once each, with the runs that raised it."""
    seen: dict[str, list[str]] = {}
    for setting in settings:
        for run in setting.runs:
            for split in SPLITS:
                for warning in run.metrics.get(split, {}).get("warnings", []):
                    seen.setdefault(f"{split}: {warning}", []).append(str(run.path))
    return [
        f"{text} ({', '.join(runs) if len(runs) <= 2 else f'{len(runs)} runs'})"
        for text, runs in seen.items()
    ]
