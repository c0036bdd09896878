"""Shortcut audit: how well does a nuisance attribute alone predict the label?

Before training anything, a user should know whether the patch labels carry a
shortcut, how strong it is, and what to do about it. For each audited attribute
(the tissue ratio and every metadata column, or the ``--attribute`` values) the
audit measures, on the training split:

- the AUROC of the attribute used as a score for the label, with a 95% image-level
  bootstrap interval (0.5 = no shortcut);
- the mutual information between label and attribute (bits);
- the label x attribute-bin table of every split (patches and images), with the
  *minority groups* named (:mod:`.counts`);
- threshold suggestions whose groups stay large enough to measure (:mod:`.thresholds`);
- given a trained run, the model's error rate per attribute bin and class
  (:mod:`.model_errors`).

It ends with a verdict per attribute and one overall, worded as an action
(:mod:`.verdict`). Nothing is chosen on the test split. Everything comes from
patches.parquet (and the run's predictions), so anyone can recompute the numbers;
plots and the written audit live in :mod:`unshortcut.report`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from unshortcut.audit.attributes import AttributeAudit, audit_attribute, default_audit_specs
from unshortcut.audit.counts import GroupCounts, group_counts
from unshortcut.audit.model_errors import ErrorCurve, run_error_curves
from unshortcut.audit.thresholds import MIN_GROUP_IMAGES, MIN_GROUP_PATCHES, TauCandidate
from unshortcut.audit.verdict import (
    RunCheck,
    Verdict,
    attribute_verdict,
    overall_verdict,
    run_verdict,
)
from unshortcut.errors import UnshortcutError
from unshortcut.groups import (
    DEFAULT_ATTRIBUTE,
    AttributeSpec,
    GroupScheme,
    fit_groups,
    parse_attribute_specs,
)
from unshortcut.report.run_folders import RunFolder
from unshortcut.tiling.patchset import PatchSet

__all__ = [
    "AttributeAudit",
    "AuditResult",
    "ErrorCurve",
    "GroupCounts",
    "TauCandidate",
    "Verdict",
    "audit_patch_set",
]


@dataclass
class AuditResult:
    """The audit of a patch set: per attribute, the groups ``train`` would form, a verdict."""

    patches: str
    attributes: list[AttributeAudit]
    scheme: GroupScheme | None
    groups: GroupCounts | None
    verdict: Verdict
    settings: dict[str, Any]
    run: RunCheck | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def intersections(self) -> GroupCounts | None:
        """The groups train forms when they cross several attributes (else None)."""
        several = self.scheme is not None and len(self.scheme.attributes) > 1
        return self.groups if several else None

    @property
    def attribute_auroc(self) -> dict[str, dict[str, float | None]]:
        """Attribute-only AUROC per attribute and split (point estimates)."""
        return {a.column: {s: v for s, (v, _) in a.auroc.items()} for a in self.attributes}

    def to_dict(self) -> dict[str, Any]:
        return {
            "patches": self.patches,
            "verdict": self.verdict.to_dict(),
            "attributes": [a.to_dict() for a in self.attributes],
            "scheme": None if self.scheme is None else self.scheme.to_dict(),
            "groups": None if self.groups is None else self.groups.records(),
            "run": None
            if self.run is None
            else {
                "path": self.run.path,
                "method": self.run.method,
                "criterion": self.run.criterion,
            },
            "settings": self.settings,
            "warnings": self.warnings,
        }


def _column_problem(table: pd.DataFrame, column: str) -> str | None:
    if column not in table.columns:
        return f"no column '{column}' (available: {', '.join(map(str, table.columns))})"
    missing = int(table[column].isna().sum())
    return f"column '{column}' has {missing} missing value(s)" if missing else None


def read_run(path: Path | str) -> tuple[RunFolder, RunCheck]:
    """Open a run folder for the audit: its headline validation numbers."""
    run = RunFolder.open(path)
    return run, RunCheck(str(run.path), run.method, run.criterion, dict(run.metrics.get("val", {})))


def audit_patch_set(
    patches: PatchSet,
    specs: Sequence[AttributeSpec] | None = None,
    *,
    taus: Sequence[float] = (),
    run: Path | str | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    min_group_patches: int = MIN_GROUP_PATCHES,
    min_group_images: int = MIN_GROUP_IMAGES,
) -> AuditResult:
    """Audit ``specs`` (default: tissue_ratio at ``taus`` and every metadata column).

    ``run`` (a run folder path) adds the model's error per attribute bin and its
    validation numbers to the verdict. The groups train would form from ``specs`` are
    counted too (for the default, tissue_ratio alone, as train's default).
    """
    table = patches.table
    source = str(patches.path / "patches.parquet")
    if not (table["split"] == "train").any():
        raise UnshortcutError(f"{source}: no training patches to audit")
    warnings: list[str] = []
    if specs:
        chosen = list(specs)
        for spec in chosen:
            problem = _column_problem(table, spec.column)
            if problem:
                raise UnshortcutError(f"{source}: {problem}")
    else:  # discovered columns: one with gaps is skipped, not fatal
        chosen = []
        for spec in default_audit_specs(table, taus):
            problem = _column_problem(table, spec.column)
            if problem:
                warnings.append(f"{problem}: not audited")
            else:
                chosen.append(spec)
    if not chosen:
        raise UnshortcutError(f"{source}: no attribute to audit ({'; '.join(warnings)})")
    audits = [
        audit_attribute(
            spec,
            table,
            source,
            n_bootstrap=n_bootstrap,
            seed=seed,
            min_patches=min_group_patches,
            min_images=min_group_images,
        )
        for spec in chosen
    ]
    varying = [a.column for a in audits if a.kind != "constant"]
    for audit in audits:
        others = [c for c in varying if c != audit.column]
        audit.verdict = attribute_verdict(audit, others, min_group_patches, min_group_images)
    warnings += [f"{a.column}: {a.note}" for a in audits if a.note and a.kind != "constant"]
    run_check = None
    if run is not None:
        folder, run_check = read_run(run)
        for audit in audits:
            if audit.kind != "constant":
                categorical = audit.kind == "categorical"
                audit.errors = run_error_curves(categorical, audit.column, table, folder)
    train_specs = chosen if specs else parse_attribute_specs([DEFAULT_ATTRIBUTE], taus)
    scheme = groups = None
    try:
        scheme = fit_groups(table[table["split"] == "train"], train_specs, source=source)
        groups = group_counts(scheme, table, source)
    except UnshortcutError as error:
        warnings.append(f"train would refuse these groups: {error}")
    verdict = overall_verdict(audits)
    if run_check is not None:
        verdict = Verdict(
            verdict.level, f"{verdict.text}. {run_verdict(run_check)}", verdict.attribute
        )
    settings = {
        "bootstrap": n_bootstrap,
        "bootstrap_unit": "image",
        "seed": seed,
        "min_group_patches": min_group_patches,
        "min_group_images": min_group_images,
        "mutual_information_unit": "bits",
        "verdict_from": "train split",
    }
    return AuditResult(source, audits, scheme, groups, verdict, settings, run_check, warnings)
