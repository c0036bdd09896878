"""Train/val/test splits that never put one patient (or one piece of tissue) in two splits.

Patches of one patient share staining, scanner and anatomy, so a model evaluated on
patches of patients it trained on looks better than it is. Splits are therefore drawn
over *units* (patients by default, images, or square spatial regions for single-slide
data) and every patch inherits its unit's split. Units are shuffled from an explicit
seed, stratified by whether they hold any tumor patch, so that small data sets still
get both classes into every split where possible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from unshortcut.errors import UnshortcutError
from unshortcut.tiling.patchset import CLASS_NAMES, SPLITS

SplitUnit = Literal["patient", "image", "region"]
SPLIT_UNITS: tuple[str, ...] = ("patient", "image", "region")


def parse_fractions(text: str) -> tuple[float, float, float]:
    """``"0.6,0.2,0.2"`` -> (0.6, 0.2, 0.2); three non-negative numbers summing to 1."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UnshortcutError(f"--split-fractions: {text!r} is not three numbers") from None
    if len(values) != 3 or any(v < 0 for v in values) or values[0] <= 0:
        raise UnshortcutError(
            f"--split-fractions: {text!r} must be three non-negative numbers "
            "train,val,test with train > 0"
        )
    if abs(sum(values) - 1.0) > 1e-6:
        raise UnshortcutError(f"--split-fractions: {text!r} must sum to 1")
    return values[0], values[1], values[2]


def allocate(n_units: int, fractions: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Units per split by largest remainder; ties are broken at random, not always for val."""
    quotas = np.asarray(fractions, dtype=float) * n_units
    counts = np.floor(quotas).astype(np.int64)
    remainders = quotas - counts
    order = np.lexsort((rng.random(len(quotas)), -remainders))
    counts[order[: n_units - counts.sum()]] += 1
    return counts


def unit_keys(table: pd.DataFrame, unit: SplitUnit, region_size: int | None = None) -> np.ndarray:
    """The split unit of every patch: its patient, its image, or its spatial region.

    A region is the square block of ``region_size`` full-resolution pixels holding the
    patch centre, so each patch lies in exactly one block.
    """
    if unit == "patient":
        return table["patient_id"].astype(str).to_numpy()
    if unit == "image":
        return table["image_id"].astype(str).to_numpy()
    if unit != "region":
        raise UnshortcutError(f"--split-unit: unknown unit {unit!r} (use {', '.join(SPLIT_UNITS)})")
    if region_size is None or region_size < 1:
        raise UnshortcutError("--region-size: must be a positive number of pixels")
    half = table["size"].to_numpy() // 2
    by = (table["y"].to_numpy() + half) // region_size
    bx = (table["x"].to_numpy() + half) // region_size
    ids = table["image_id"].astype(str).to_numpy()
    return np.array([f"{i}#{r},{c}" for i, r, c in zip(ids, by, bx, strict=True)], dtype=object)


def draw_splits(
    units: np.ndarray, labels: np.ndarray, fractions: Sequence[float], seed: int
) -> np.ndarray:
    """Split name for every patch, drawn over its unit.

    Units are stratified by whether they hold a tumor patch; within each stratum they
    are shuffled from ``seed`` and dealt out by ``fractions``. Afterwards every split
    with a positive fraction gets at least one unit when there are enough units.
    """
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"unit": units, "label": labels})
    has_tumor = frame.groupby("unit", sort=True)["label"].max()
    assigned: dict[str, int] = {}
    for stratum in (1, 0):
        members = has_tumor.index[has_tumor.to_numpy() == stratum].to_numpy()
        members = members[rng.permutation(len(members))]
        counts = allocate(len(members), fractions, rng)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for split_index in range(len(SPLITS)):
            for member in members[bounds[split_index] : bounds[split_index + 1]]:
                assigned[member] = split_index
    _fill_empty_splits(assigned, fractions, rng)
    index = np.array([assigned[u] for u in units], dtype=np.int64)
    return np.asarray(SPLITS, dtype=object)[index]


def _fill_empty_splits(
    assigned: dict[str, int], fractions: Sequence[float], rng: np.random.Generator
) -> None:
    """Move single units from the largest split into empty splits that asked for data."""
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if len(assigned) < len(wanted):
        return
    for split_index in wanted:
        sizes = np.bincount(list(assigned.values()), minlength=len(SPLITS))
        if sizes[split_index]:
            continue
        donor = int(np.argmax(sizes))
        candidates = sorted(u for u, s in assigned.items() if s == donor)
        assigned[candidates[int(rng.integers(len(candidates)))]] = split_index


def split_warnings(
    table: pd.DataFrame, fractions: Sequence[float] | None = None, check_patients: bool = True
) -> list[str]:
    """Problems a user must see: empty splits, splits without a class, shared patients.

    ``check_patients`` is off for region splits, which cut one patient's slide on purpose.
    """
    problems: list[str] = []
    for i, split in enumerate(SPLITS):
        if fractions is not None and fractions[i] == 0:
            continue
        rows = table[table["split"] == split]
        if rows.empty:
            problems.append(f"split {split!r} is empty")
            continue
        for label, name in enumerate(CLASS_NAMES):
            if not (rows["label"] == label).any():
                problems.append(f"split {split!r} has no {name} patches")
    if not check_patients:
        return problems
    shared = table.groupby("patient_id")["split"].nunique()
    for patient in shared.index[shared.to_numpy() > 1]:
        problems.append(f"patient {patient!r} appears in more than one split")
    return problems
