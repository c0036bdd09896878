"""The verdict: a strength level per attribute and a sentence a person can act on.

Levels come from the training AUROC of the attribute alone and its image-bootstrap
interval: strong (|AUROC - 0.5| >= 0.2), moderate (>= 0.1), weak (>= 0.05), none;
inconclusive when the interval includes 0.5 although the estimate is at least weak;
constant when the attribute does not vary in the training split. The sentence names
the minority groups, their share, the methods to train with, and warns when a
minority group is too small to measure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unshortcut.audit.thresholds import MIN_GROUP_IMAGES, MIN_GROUP_PATCHES
from unshortcut.groups import DEFAULT_ATTRIBUTE
from unshortcut.report.formatting import auc, pct

if TYPE_CHECKING:
    from unshortcut.audit.attributes import AttributeAudit

STRENGTH = (("strong", 0.2), ("moderate", 0.1), ("weak", 0.05))
"""Levels, strongest first, and the |AUROC - 0.5| each needs."""
RANK = ("constant", "none", "weak", "inconclusive", "moderate", "strong")
"""Levels from least to most urgent (the overall verdict is the most urgent one)."""
TISSUE_METHODS = ("gerne", "spatial-mask")
"""What to train against a tissue-size shortcut (spatial-mask learns from the tumor masks)."""
METADATA_METHODS = ("gerne", "groupdro")
"""What to train against a shortcut through an image-level attribute (site, scanner, ...)."""
GAP_POINTS = 0.10
"""Validation balanced minus worst-group accuracy from which a run counts as using the shortcut."""


@dataclass(frozen=True)
class Verdict:
    """A strength level and a sentence a person can act on."""

    level: str
    text: str
    attribute: str

    def to_dict(self) -> dict[str, str]:
        return {"level": self.level, "attribute": self.attribute, "text": self.text}


@dataclass(frozen=True)
class RunCheck:
    """What the audit reads from a trained run: its validation headline numbers."""

    path: str
    method: str
    criterion: str
    val: dict[str, Any]

    def gap(self) -> float | None:
        """Balanced minus worst-group accuracy on validation."""
        bca, wga = self.val.get("balanced_accuracy"), self.val.get("worst_group_accuracy")
        return None if bca is None or wga is None else bca - wga


def _shortcut_name(column: str) -> str:
    return "tissue-size shortcut" if column == DEFAULT_ATTRIBUTE else f"{column} shortcut"


def _methods(column: str) -> str:
    names = TISSUE_METHODS if column == DEFAULT_ATTRIBUTE else METADATA_METHODS
    option = "" if column == DEFAULT_ATTRIBUTE else f" (--attribute {column})"
    return f"{' or '.join(names)}{option}"


def _level(audit: AttributeAudit) -> str:
    if audit.kind == "constant":
        return "constant"
    value, ci = audit.auroc.get("train", (None, None))
    if value is None:
        return "none"
    distance = abs(value - 0.5)
    level = next((name for name, at_least in STRENGTH if distance >= at_least), "none")
    if ci is not None and ci[0] <= 0.5 <= ci[1]:
        return "inconclusive" if level != "none" else "none"
    return level


def attribute_verdict(
    audit: AttributeAudit,
    others: Sequence[str] = (),
    min_patches: int = MIN_GROUP_PATCHES,
    min_images: int = MIN_GROUP_IMAGES,
) -> Verdict:
    """Strength level and an action, from the training AUROC, its interval and the groups.

    Levels: strong (|AUROC - 0.5| >= 0.2), moderate (>= 0.1), weak (>= 0.05), none;
    inconclusive when the interval includes 0.5 although the estimate is at least weak;
    constant when the attribute does not vary in the training split.
    """
    level, column, name = _level(audit), audit.column, _shortcut_name(audit.column)
    if level == "constant":
        hint = f" (e.g. --attribute {others[0]})" if others else ""
        text = f"no variation: {audit.note}, so no {name} can exist; audit another attribute{hint}"
        return Verdict(level, text, column)
    value, ci = audit.auroc["train"]
    auroc = f"{column} alone predicts the label with training AUROC {auc(value, ci)}"
    if audit.kind == "numeric" and level != "none" and value is not None:
        side = "tumor" if value >= 0.5 else "non-tumor"
        auroc += f" (higher values in {side} patches)"
    groups = ""
    if audit.counts is not None:
        minority = audit.counts.minority_groups
        groups = (
            f"; the minority groups ({', '.join(minority)}) hold "
            f"{100 * audit.counts.minority_share:.0f}% of training patches"
        )
    if level in ("strong", "moderate"):
        text = (
            f"{level} {name}: {auroc}{groups}; train with {_methods(column)} and select by "
            "validation worst-group accuracy"
        )
    elif level == "inconclusive":
        text = (
            f"inconclusive {name}: {auroc}, but the interval includes 0.5 (too few images to "
            f"tell); add images, or train with {_methods(column)} and compare with erm on "
            "worst-group accuracy"
        )
    elif level == "weak":
        text = (
            f"weak {name}: {auroc}{groups}; erm is likely enough, but select it by validation "
            "worst-group accuracy and check the groups' accuracy"
        )
    else:
        text = f"no {name}: {auroc}; nothing to correct for {column}"
    return Verdict(level, text + _measurability(audit, min_patches, min_images), column)


def _measurability(audit: AttributeAudit, min_patches: int, min_images: int) -> str:
    """A warning when a minority group is too small to measure, and the taus that fix it."""
    if audit.counts is None:
        return f" ({audit.note}; see the suggested thresholds)" if audit.note else ""
    for split in ("train", "val"):
        smallest = audit.counts.smallest(split)
        if smallest is None:
            continue
        group, n, images = smallest
        if n < min_patches or images < min_images:
            best = audit.suggested_taus[:1]
            fix = f"; --tau {best[0].tau:g} keeps every group measurable" if best else ""
            return (
                f". Warning: the minority group {group} has {n} {split} patches from {images} "
                f"image(s), too few to measure its accuracy (>= {min_patches} patches from "
                f">= {min_images} images){fix}"
            )
    return ""


def run_verdict(run: RunCheck) -> str:
    """Whether a trained run uses the shortcut, from validation numbers only."""
    val, gap = run.val, run.gap()
    if gap is None:
        return f"Run {run.path} ({run.method}): validation accuracies are undefined"

    numbers = (
        f"validation worst-group accuracy {pct(val.get('worst_group_accuracy'))}% vs balanced "
        f"accuracy {pct(val.get('balanced_accuracy'))}%, robust AUROC "
        f"{auc(val.get('robust_auroc'))} vs AUROC {auc(val.get('auroc'))}"
    )
    finding = "it relies on the shortcut" if gap >= GAP_POINTS else "no large worst-group gap"
    return f"Run {run.path} ({run.method}): {numbers}: {finding}"


def overall_verdict(audits: Sequence[AttributeAudit]) -> Verdict:
    """The verdict of the attribute with the strongest level (then the largest AUROC distance)."""
    chosen = max(
        audits, key=lambda a: (RANK.index(a.verdict.level if a.verdict else "none"), a.strength)
    )
    assert chosen.verdict is not None
    return chosen.verdict
