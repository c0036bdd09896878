"""The audit in the terminal: rich tables that stay readable 80 columns wide.

Group names such as ``non-tumor|tissue_ratio>=0.5`` are what a user types and
searches for, so they are never cut: each attribute's counts are a label x bin cross
table (the bin names in rows, the classes in columns), cells fold instead of
ellipsising, and the minority groups are listed by their full names, one per line.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from unshortcut.audit import AttributeAudit, AuditResult, GroupCounts
from unshortcut.report.formatting import MISSING, auc, number, pct


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)


def summary_table(result: AuditResult) -> Table:
    """Attribute, training AUROC with its interval, mutual information, minority share, level."""
    table = _table("How well each attribute alone predicts the label (train)")
    table.add_column("attribute", overflow="fold")
    table.add_column("AUROC [95% CI]", justify="right", no_wrap=True)
    table.add_column("MI bits", justify="right", no_wrap=True)
    table.add_column("minority", justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    for a in result.attributes:
        value, ci = a.auroc.get("train", (None, None))
        share = MISSING if a.counts is None else f"{pct(a.counts.minority_share, 0)}%"
        table.add_row(
            a.column,
            auc(value, ci),
            number(a.mutual_information_bits),
            share,
            a.verdict.level if a.verdict else MISSING,
        )
    return table


def _crosstab_table(counts: GroupCounts, title: str, names: Sequence[str], keyed: bool) -> Table:
    splits = " / ".join(counts.patches)
    table = _table(f"{title}: patches ({splits})")
    table.caption = "* minority group" + (", bins b1... named below" if keyed else "")
    table.caption_justify = "left"
    table.add_column("bin", overflow="fold")
    for name in counts.class_names:
        table.add_column(name, justify="right", no_wrap=True)
    for a, name in enumerate(names):
        cells = []
        for y in range(len(counts.class_names)):
            numbers = " / ".join(str(int(n[y, a])) for n in counts.patches.values())
            cells.append(f"{numbers}{'*' if counts.minority[y, a] else ' '}")
        table.add_row(name, *cells)
    return table


def crosstab(counts: GroupCounts, title: str, width: int) -> list[RenderableType]:
    """Patches per bin (rows) and class (columns) as 'train / val / test'; * marks minority.

    When the bin names do not fit beside the counts in ``width`` columns (long
    intersections), the rows show keys b1, b2, ... and a legend below names them whole.
    """
    table = _crosstab_table(counts, title, counts.bin_names, keyed=False)
    if Console(width=10 * width).measure(table).maximum <= width:  # unwrapped width
        return [table]
    keys = [f"b{k + 1}" for k in range(len(counts.bin_names))]
    legend = [f"{key} = {name}" for key, name in zip(keys, counts.bin_names, strict=True)]
    return [_crosstab_table(counts, title, keys, keyed=True), _lines("bins", legend)]


def _lines(title: str, items: list[str]) -> Text:
    text = Text(f"{title}:\n", style="bold")
    for item in items:
        text.append(f"  {item}\n", style="")
    return text


def error_table(audit: AttributeAudit, split: str) -> Table:
    """The run's error rate (%) per bin and class in ``split``, with the patch counts."""
    curve = audit.errors[split]
    table = _table(f"{audit.column}: the run's error rate in {split} (% of patches, n)")
    table.add_column("bin", overflow="fold")
    table.add_column("non-tumor (false pos.)", justify="right", no_wrap=True)
    table.add_column("tumor (false neg.)", justify="right", no_wrap=True)
    for b, name in enumerate(curve.bins):
        cells = []
        for y in range(2):
            n, wrong = int(curve.n[y, b]), int(curve.errors[y, b])
            cells.append(f"{pct(wrong / n, 0)}% of {n}" if n else "-")
        table.add_row(name, *cells)
    return table


def attribute_renderables(audit: AttributeAudit, width: int) -> list[RenderableType]:
    parts: list[RenderableType] = []
    if audit.counts is not None:
        parts += crosstab(audit.counts, audit.column, width)
        minority = audit.counts.minority_groups or ["none (each bin holds the classes alike)"]
        parts.append(_lines("minority groups", minority))
    suggested = audit.suggested_taus
    if suggested:
        items = [
            f"tau {t.tau:g}: class gap {t.gap:.2f}, smallest val group "
            f"{t.smallest['val'][1]} patches from {t.smallest['val'][2]} images"
            for t in suggested
        ]
        parts.append(_lines(f"{audit.column} thresholds that keep every group measurable", items))
    elif audit.taus:
        parts.append(Text(f"{audit.column}: no threshold keeps every group measurable\n"))
    if "val" in audit.errors:
        parts.append(error_table(audit, "val"))
    if audit.verdict is not None:
        parts.append(Text.assemble((f"{audit.column}: ", "bold"), audit.verdict.text, "\n"))
    return parts


def audit_renderables(result: AuditResult, width: int = 80) -> Group:
    """Everything the audit prints for a ``width``-column terminal, ending with the verdict."""
    parts: list[RenderableType] = [summary_table(result)]
    for audit in result.attributes:
        parts += attribute_renderables(audit, width)
    if result.intersections is not None:
        parts += crosstab(result.intersections, "groups for training", width)
    parts.append(Text.assemble(("verdict: ", "bold"), result.verdict.text))
    return Group(*parts)
