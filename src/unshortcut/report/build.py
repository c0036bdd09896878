"""Build the report of one run or a folder of runs, and write its HTML page and Markdown twin.

The report opens with a summary (the audit's verdict) and the headline metrics, then
the shortcut audit of the runs' patch set (with the runs' own grouping attributes),
accuracy per group, what each selection criterion picks, training curves, the error
against the attribute, the selection protocol, the exact configurations and every
warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from unshortcut.atomic import atomic_directory, atomic_write_text
from unshortcut.audit import AuditResult, audit_patch_set
from unshortcut.errors import UnshortcutError
from unshortcut.groups import parse_attribute_specs
from unshortcut.report.audit_section import audit_section
from unshortcut.report.document import Bullets, Document, Paragraph, Section
from unshortcut.report.html import render_html
from unshortcut.report.markdown import render_markdown
from unshortcut.report.run_folders import find_runs
from unshortcut.report.run_sections import (
    SPLITS,
    config_section,
    curves_section,
    error_section,
    groups_section,
    protocol_section,
    results_section,
    run_warnings,
    selection_section,
)
from unshortcut.report.settings import Setting, group_settings
from unshortcut.tiling.patchset import PatchSet

REPORT_FILE = "report.html"


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    markdown: Path
    figures: Path
    warnings: tuple[str, ...]


def _audit_for(setting: Setting, n_bootstrap: int, seed: int) -> AuditResult:
    """The audit of the setting's patch set with the setting's grouping attributes."""
    patches = setting.runs[0].patches
    if patches is None or not patches.is_dir():
        raise UnshortcutError(f"the patch set {patches} of {setting.runs[0].path} is not here")
    config = setting.config
    specs = parse_attribute_specs(config.get("attributes") or [], config.get("taus") or [])
    return audit_patch_set(
        PatchSet.open(patches), specs or None, n_bootstrap=n_bootstrap, seed=seed
    )


def _summary(source: Path, settings: Sequence[Setting], audits: dict[str, AuditResult]) -> Section:
    n_runs = sum(len(s.runs) for s in settings)
    items = [
        f"Source: {source}",
        f"{n_runs} run(s) in {len(settings)} setting(s): "
        + "; ".join(f"{s.label} ({len(s.runs)} run(s))" for s in settings),
    ]
    criteria = sorted({run.criterion for s in settings for run in s.runs})
    items.append(f"Checkpoints chosen by validation {', '.join(criteria)}; test scored once")
    items += [f"Audit of {patches}: {audit.verdict.level}" for patches, audit in audits.items()]
    blocks = [Bullets(tuple(items))]
    blocks += [Paragraph(f"Verdict: {a.verdict.text}", emphasis=True) for a in audits.values()]
    return Section("Summary", blocks)


def build_report(
    source: Path | str, *, n_bootstrap: int = 1000, seed: int = 0
) -> tuple[Document, list[str]]:
    """The report document of every run below ``source``, and the warnings it collected."""
    source = Path(source)
    settings = group_settings(find_runs(source))
    warnings: list[str] = []
    if len(settings) > 1 and all(len(s.runs) == 1 for s in settings):
        warnings.append(
            "every setting has a single run (one seed): differences between settings may be "
            "seed noise; train several seeds to see the spread"
        )
    audits: dict[str, AuditResult] = {}
    audit_sections, error_sections = [], []
    by_patches: dict[str, list[Setting]] = {}
    for setting in settings:
        by_patches.setdefault(str(setting.runs[0].patches), []).append(setting)
    for patches, group in by_patches.items():
        try:
            audit = _audit_for(group[0], n_bootstrap, seed)
        except UnshortcutError as error:
            warnings.append(f"no audit and no error plots for {patches}: {error}")
            continue
        audits[patches] = audit
        title = "Shortcut audit" if len(by_patches) == 1 else f"Shortcut audit of {patches}"
        audit_sections.append(audit_section(audit, title, with_verdict=False))
        warnings += audit.warnings
        table = PatchSet.open(patches).table
        columns = [a.column for a in audit.scheme.attributes] if audit.scheme else []
        try:
            error_sections.append(error_section(group, table, columns))
        except UnshortcutError as error:
            warnings.append(f"no error plots for {patches}: {error}")
    warnings += run_warnings(settings)
    for setting in settings:
        for run in setting.runs:
            missing = [s for s in SPLITS if not run.has_predictions(s)]
            if missing:
                warnings.append(f"{run.path}: no predictions for {', '.join(missing)}")
    sections = [
        _summary(source, settings, audits),
        results_section(settings),
        *audit_sections,
        groups_section(settings),
        selection_section(settings),
        curves_section(settings),
        *error_sections,
        protocol_section(settings),
        config_section(settings),
        Section("Warnings", [Bullets(tuple(warnings)) if warnings else Paragraph("None.")]),
    ]
    title = f"unshortcut report: {source.resolve().name}"
    return Document(title, str(source), sections), warnings


def write_report(
    source: Path | str, out: Path | str | None = None, *, n_bootstrap: int = 1000, seed: int = 0
) -> ReportFiles:
    """Write ``out`` (default SOURCE/report.html), its Markdown twin and the twin's figures.

    The HTML page embeds its images and needs nothing else; the Markdown file links to
    PNGs in ``<stem>-figures/`` beside it. Each file is replaced atomically.
    """
    source = Path(source)
    out = Path(out) if out is not None else source / REPORT_FILE
    if out.suffix.lower() not in (".html", ".htm"):
        raise UnshortcutError(
            f"--out {out}: give an .html file name (the Markdown twin goes beside it)"
        )
    document, warnings = build_report(source, n_bootstrap=n_bootstrap, seed=seed)
    figures = out.with_name(f"{out.stem}-figures")
    markdown, files = render_markdown(document, figures.name)
    with atomic_directory(figures, overwrite=True) as tmp:
        for name, png in files.items():
            (tmp / name).write_bytes(png)
    atomic_write_text(out.with_suffix(".md"), markdown)
    atomic_write_text(out, render_html(document))
    return ReportFiles(out, out.with_suffix(".md"), figures, tuple(warnings))
