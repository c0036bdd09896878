"""The table rows of the patches to generate: their conditions and every other column.

A generated patch is asked for by group (label x attribute bins). Its label and
categorical attributes are the group's; the remaining values, above all the exact
tissue ratio inside the requested bin, come from a *donor*: a real training row
drawn at random from the same group. Donor draws keep the joint distribution of
the conditions realistic (a tissue ratio that goes with that site, say) and fill
every other metadata column with a value that exists.

When the group has no real training rows (a combination absent from training, the
case MeDi targets), the donor is drawn from rows with the same label and numeric
bins, then from rows in the same numeric bins whatever the label; the label and
categorical attributes are set to the requested ones all the same. The tumor
fraction comes from the donor when it has the requested label, else from a real
row of that label. Which rule applied is reported per group.

Identifiers (see docs/generate.md): one synthetic *patient* per group and one
synthetic *image* per ``patches_per_image`` patches, ``synthetic-<group>-<k>``, so
image-level tools see generated patches in image-sized units; ``x``, ``y``, ``size``
and ``level`` are -1 (no place on any slide).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from unshortcut.errors import UnshortcutError
from unshortcut.generate.conditioning import ConditionEncoder
from unshortcut.groups import BinnedAttribute, GroupScheme

DONOR_RULES = ("group", "label and numeric bins", "numeric bins")
NO_POSITION = -1
_SLUG_REPLACEMENTS = ((">=", "-ge-"), ("<=", "-le-"), ("<", "-lt-"), ("=", "-eq-"), ("|", "_"),
                      ("&", "+"))  # fmt: skip


@dataclass(frozen=True)
class GroupDraw:
    """Rows to generate for one group, and which donor rule supplied their values."""

    group: str
    rows: pd.DataFrame
    donor_rule: str


def check_generator_covers(scheme: GroupScheme, encoder: ConditionEncoder, run: str) -> None:
    """Every attribute that defines the groups must be a condition of the same kind."""
    for attribute in scheme.attributes:
        condition = encoder.condition(attribute.column)
        if condition is None:
            raise UnshortcutError(
                f"{run}: the generator is not conditioned on '{attribute.column}', so it cannot "
                f"make patches of a chosen {attribute.column} bin (its conditions: "
                f"{', '.join(encoder.columns)})"
            )
        if bool(attribute.categories) != condition.categorical:
            kind, suffix = ("categorical", ":cat") if condition.categorical else ("continuous", "")
            raise UnshortcutError(
                f"{run}: '{attribute.column}' is a {kind} condition of the generator; bin it "
                f"the same way (--attribute {attribute.column}{suffix})"
            )


def group_bins(scheme: GroupScheme, group: int) -> tuple[int, list[int]]:
    """Label and per-attribute bin of a group index (the first attribute most significant)."""
    label, rest = divmod(group, scheme.n_attributes)
    bins = []
    for attribute in reversed(scheme.attributes):
        rest, b = divmod(rest, attribute.n_bins)
        bins.append(b)
    return label, bins[::-1]


def draw_rows(
    real: pd.DataFrame,
    scheme: GroupScheme,
    group: int,
    count: int,
    rng: np.random.Generator,
    source: str,
) -> GroupDraw:
    """``count`` rows for ``group`` with donor values from the real training rows ``real``."""
    label, bins = group_bins(scheme, group)
    labels = scheme.labels(real, source)
    in_bins = {
        a.column: a.bin_index(real, source) == b
        for a, b in zip(scheme.attributes, bins, strict=True)
    }
    numeric = np.ones(len(real), bool)
    categorical = np.ones(len(real), bool)
    for attribute in scheme.attributes:
        if attribute.categories:
            categorical &= in_bins[attribute.column]
        else:
            numeric &= in_bins[attribute.column]
    pools = (labels == label) & numeric & categorical, (labels == label) & numeric, numeric
    name = scheme.group_names[group]
    level = next((i for i, pool in enumerate(pools) if pool.any()), None)
    if level is None:
        raise UnshortcutError(
            f"{source}: no real training row lies in the numeric bins of {name!r}, so there is "
            "no tissue ratio to ask for there"
        )
    donors = rng.choice(np.flatnonzero(pools[level]), count, replace=True)
    rows = real.iloc[donors].reset_index(drop=True)
    same_label = labels[donors] == label
    if not same_label.all():
        of_label = np.flatnonzero(pools[1] if pools[1].any() else labels == label)
        fractions = real["tumor_fraction"].to_numpy()[rng.choice(of_label, count, replace=True)]
        kept = rows["tumor_fraction"].to_numpy()
        rows["tumor_fraction"] = np.where(same_label, kept, fractions)
    rows[scheme.label_column] = label
    for attribute, b in zip(scheme.attributes, bins, strict=True):
        if attribute.categories:
            rows[attribute.column] = _typed_value(real, attribute, b)
    return GroupDraw(name, rows.astype(real.dtypes.to_dict()), DONOR_RULES[level])


def _typed_value(real: pd.DataFrame, attribute: BinnedAttribute, b: int) -> object:
    """The column's own value (not its text) for category ``b``."""
    text = real[attribute.column].astype(str).to_numpy()
    match = np.flatnonzero(text == attribute.categories[b])
    if not len(match):  # a category seen only in generated training rows
        return attribute.categories[b]
    return real[attribute.column].iloc[match[0]]


def group_slug(name: str) -> str:
    """A group name as an id part: ``tumor|tissue_ratio<0.5`` -> ``tumor_tissue_ratio-lt-0.5``."""
    for old, new in _SLUG_REPLACEMENTS:
        name = name.replace(old, new)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name)


def assign_identities(
    draws: Sequence[GroupDraw], existing_image_ids: Sequence[str], patches_per_image: int
) -> pd.DataFrame:
    """All drawn rows with ids, split, synthetic flag and positions set (in draw order).

    Image numbers continue after those already in the patch set, so topping up an
    augmented set never reuses an id.
    """
    if patches_per_image < 1:
        raise UnshortcutError(f"--patches-per-image: must be at least 1, got {patches_per_image}")
    existing = set(map(str, existing_image_ids))
    parts = []
    for draw in draws:
        prefix = f"synthetic-{group_slug(draw.group)}"
        first = sum(1 for i in existing if i.startswith(f"{prefix}-"))
        n = len(draw.rows)
        image = first + np.arange(n) // patches_per_image
        within = np.arange(n) % patches_per_image
        rows = draw.rows.copy()
        rows["image_id"] = [f"{prefix}-{k:04d}" for k in image]
        rows["patient_id"] = prefix
        rows["patch_id"] = [f"{i}@{j}" for i, j in zip(rows["image_id"], within, strict=True)]
        rows["split"] = "train"
        rows["synthetic"] = True
        for column in ("x", "y", "size", "level"):
            rows[column] = NO_POSITION
        parts.append(rows)
    table = pd.concat(parts, ignore_index=True)
    clash = set(table["image_id"]) & existing
    if clash:
        raise UnshortcutError(f"generated image ids already in the patch set: {sorted(clash)[:3]}")
    return table
