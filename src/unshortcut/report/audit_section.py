"""The audit as a report section, and the audit folder that ``unshortcut audit --out`` writes.

The same section opens the run report, so an audit read alone and an audit read in
a report say the same thing in the same words.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from unshortcut.atomic import atomic_directory
from unshortcut.audit import AttributeAudit, AuditResult, ErrorCurve, GroupCounts
from unshortcut.audit.model_errors import MIN_ERROR_BIN
from unshortcut.audit.thresholds import rank_measurable
from unshortcut.report.document import (
    Block,
    Bullets,
    Document,
    Figure,
    Paragraph,
    Section,
    Table,
)
from unshortcut.report.formatting import MISSING, auc, number, pct
from unshortcut.report.html import render_html
from unshortcut.report.markdown import render_markdown
from unshortcut.report.plots import distribution_png, error_png

AUDIT_IMAGES = "figures"


def group_table(counts: GroupCounts, caption: str) -> Table:
    """One row per group: patches (images) per split, training share within class, minority."""
    splits = list(counts.patches)
    rows = []
    for y, a in np.ndindex(counts.patches["train"].shape):
        train = counts.patches["train"]
        within = train[y, a] / max(train[y].sum(), 1)
        cells = [f"{counts.patches[s][y, a]} ({counts.images[s][y, a]})" for s in splits]
        minority = "minority" if counts.minority[y, a] else ""
        rows.append((counts.group_name(y, a), minority, *cells, pct(float(within))))
    columns = ("group", "", *(f"{s} patches (images)" for s in splits), "% of class (train)")
    return Table(columns, tuple(rows), caption, numeric=(False, False, *[True] * (len(splits) + 1)))


def attribute_table(result: AuditResult) -> Table:
    """One row per attribute: AUROC alone per split, mutual information, minority share, level."""
    rows = []
    for a in result.attributes:
        aurocs = [auc(*a.auroc[s]) if s in a.auroc else MISSING for s in ("train", "val", "test")]
        share = MISSING if a.counts is None else pct(a.counts.minority_share, 0)
        level = a.verdict.level if a.verdict else MISSING
        mi = f"{number(a.mutual_information_bits)} / {number(a.mutual_information_knn_bits)}"
        rows.append((a.column, a.kind, *aurocs, mi, share, level))
    columns = (
        "attribute",
        "kind",
        "AUROC alone, train [95% CI]",
        "val",
        "test",
        "MI bits (bins / kNN)",
        "minority % (train)",
        "verdict",
    )
    caption = (
        "How well each attribute alone predicts the label. AUROC 0.5 = not at all; "
        "intervals resample images. Mutual information with the label in bits."
    )
    return Table(columns, tuple(rows), caption, numeric=(False, False, *[True] * 5, False))


TAU_ROWS = 8


def tau_blocks(audit: AttributeAudit, min_patches: int, min_images: int) -> list[Block]:
    """The measurable thresholds, most exposing first; or why there is none.

    Every candidate, measurable or not, is in audit.json.
    """
    limits = f">= {min_patches} patches from >= {min_images} images in train and validation"
    measurable = rank_measurable(audit.taus)
    if not measurable:
        best = max(audit.taus, key=lambda t: t.smallest.get("val", ("", 0, 0))[1])
        val = best.smallest.get("val")
        detail = (
            f"; the largest is {val[1]} patches from {val[2]} images at tau {best.tau:g}"
            if val
            else ""
        )
        return [
            Paragraph(
                f"No candidate threshold keeps every group measurable ({limits}): the smallest "
                f"validation group is too small at every threshold{detail}."
            )
        ]
    rank = {id(t): k + 1 for k, t in enumerate(audit.suggested_taus)}
    rows = []
    for t in measurable[:TAU_ROWS]:
        smallest = [f"{t.smallest[s][1]} ({t.smallest[s][2]})" for s in ("train", "val")]
        rows.append((f"{t.tau:g}", number(t.gap, 2), *smallest, str(rank.get(id(t), ""))))
    columns = (
        "tau",
        "class gap",
        "smallest train group (images)",
        "smallest val group (images)",
        "suggested",
    )
    caption = (
        f"Measurable thresholds ({limits}), largest class gap first: |share >= tau among tumor "
        f"- among non-tumor| in train. {len(audit.taus) - len(measurable)} of {len(audit.taus)} "
        "candidates (training quantiles) are not measurable."
    )
    return [Table(columns, tuple(rows), caption)]


def error_figure(column: str, curves: dict[str, ErrorCurve], caption: str, name: str) -> Figure:
    """The error-rate plot of one attribute for several series (splits or settings)."""
    first = next(iter(curves.values()))
    rates = {series: curve.rate for series, curve in curves.items()}
    return Figure(error_png(column, first.bins, first.edges, rates), caption, name)


def attribute_section(audit: AttributeAudit, settings: dict[str, Any]) -> Section:
    blocks: list[Block] = []
    if audit.verdict is not None:
        blocks.append(Paragraph(audit.verdict.text, emphasis=True))
    if audit.counts is not None:
        blocks.append(group_table(audit.counts, f"Label x {audit.column} bins in every split"))
    if audit.distribution:
        png = distribution_png(audit.column, audit.distribution, audit.edges)
        caption = f"{audit.column} per class in the training split"
        blocks.append(Figure(png, caption, f"distribution-{audit.column}"))
    if audit.taus:
        blocks += tau_blocks(audit, settings["min_group_patches"], settings["min_group_images"])
    if audit.errors:
        caption = (
            f"The run's error rate against {audit.column} per class (bins with fewer than "
            f"{MIN_ERROR_BIN} patches left out)"
        )
        blocks.append(error_figure(audit.column, audit.errors, caption, f"error-{audit.column}"))
    if audit.note and audit.kind != "constant":
        blocks.append(Paragraph(f"Note: {audit.note}"))
    return Section(audit.column, blocks)


def audit_section(
    result: AuditResult, title: str = "Shortcut audit", with_verdict: bool = True
) -> Section:
    """Verdict, the attribute table, one subsection per attribute, the groups train forms.

    ``with_verdict=False`` leaves the overall verdict to the caller (the report's summary).
    """
    verdict = [Paragraph(f"Verdict: {result.verdict.text}", emphasis=True)] if with_verdict else []
    blocks: list[Block] = [
        *verdict,
        attribute_table(result),
        Bullets(
            (
                f"Patch set: {result.patches}",
                "Minority group: a class in an attribute bin that is relatively more typical "
                "of the other class in the training split (p(bin | class) < p(bin | other)).",
                f"Intervals: 95% percentile bootstrap over images, "
                f"{result.settings['bootstrap']} resamples, seed {result.settings['seed']}.",
                "The verdict reads the training split only; nothing is chosen on test data.",
            )
        ),
    ]
    subsections = [attribute_section(a, result.settings) for a in result.attributes]
    if result.intersections is not None:
        caption = "Intersectional groups that train forms from these attributes"
        table = group_table(result.intersections, caption)
        subsections.append(Section("groups for training", [table]))
    if result.warnings:
        subsections.append(Section("audit warnings", [Bullets(tuple(result.warnings))]))
    return Section(title, blocks, subsections)


def audit_document(result: AuditResult) -> Document:
    return Document("Shortcut audit", result.patches, [audit_section(result, "Audit")])


def write_audit(result: AuditResult, out: Path | str, overwrite: bool = False) -> None:
    """audit.json, groups.csv, audit.html (self-contained), audit.md and its PNGs, atomically."""
    document = audit_document(result)
    markdown, figures = render_markdown(document, AUDIT_IMAGES)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / "audit.json").write_text(
            json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8"
        )
        if result.groups is not None:
            pd.DataFrame(result.groups.records()).to_csv(tmp / "groups.csv", index=False)
        (tmp / AUDIT_IMAGES).mkdir()
        for name, png in figures.items():
            (tmp / AUDIT_IMAGES / name).write_bytes(png)
        (tmp / "audit.md").write_text(markdown, encoding="utf-8")
        (tmp / "audit.html").write_text(render_html(document), encoding="utf-8")
