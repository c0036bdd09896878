"""Generate patches for chosen groups and write them, with quality checks, as a new patch set.

:func:`augment_patch_set` is the one entry point (``unshortcut generate sample`` and
the ``medi`` training method call it): it fits the training groups, works out how
many patches each group needs (a fixed count or a :class:`BalancePolicy`), draws
their conditions from real donor rows, samples them from the trained generator,
judges them, and writes the source patch set plus the generated rows.

Generated masks: a generator trained ``with_mask`` makes the tumor mask as an extra
channel; a non-tumor patch's mask is set to zero and a tumor patch's tumor fraction
is its mask's mean (the donor's when the generated mask came out empty). Without
mask generation the mask is uniform at the row's tumor fraction: correct in total,
silent about where the tumor is.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from unshortcut.errors import UnshortcutError
from unshortcut.generate.balance import BalancePolicy, plan_counts, sampling_scheme
from unshortcut.generate.judge import attribute_bins, cached_judge, targets
from unshortcut.generate.quality import (
    MAX_REFERENCE_ROWS,
    LabelledRows,
    quality_report,
    read_rows,
)
from unshortcut.generate.scaling import masks_inverse, to_dtype
from unshortcut.generate.targets import (
    GroupDraw,
    assign_identities,
    check_generator_covers,
    draw_rows,
)
from unshortcut.generate.training import Generator, derive_seed, load_generator, real_rows
from unshortcut.generate.writer import write_augmented_patch_set
from unshortcut.groups import GroupScheme
from unshortcut.tiling.patchset import TABLE_FILE, PatchSet

PATCHES_PER_IMAGE = 64
QUALITY_FILE = "quality/quality.json"
# Validation rows the quality checks read at most.
MAX_VAL_ROWS = 2000
# Random streams (the last seed word) of the donor draws, the noise and the checks.
_DONORS, _NOISE, _QUALITY = 11, 12, 13

OnProgress = Callable[[str, int, int], None]
"""(stage, done, total): stages "judge", "sample"."""


@dataclass
class GenerationResult:
    """The written patch set, the patches generated per group and the quality report."""

    patchset: PatchSet
    counts: dict[str, int]
    quality: dict[str, Any]


def augment_patch_set(
    run: Path | str,
    out: Path | str,
    *,
    patches: Path | str | None = None,
    count: int | None = None,
    policy: BalancePolicy | str | None = None,
    groups: Sequence[str] | None = None,
    attributes: Sequence[str] = (),
    taus: Sequence[float] = (),
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float | None = None,
    patches_per_image: int = PATCHES_PER_IMAGE,
    device: str = "auto",
    overwrite: bool = False,
    on_progress: OnProgress | None = None,
) -> GenerationResult:
    """Write ``out``: ``patches`` (default: the generator's own) plus generated training rows.

    Exactly one of ``count`` (patches per chosen group) and ``policy`` (``largest``,
    ``ratio:R``, ``count:N``; see :mod:`.balance`). ``groups`` are group names as
    ``unshortcut train`` prints them (default: all groups) of the groups defined by
    ``attributes``/``taus`` (default: tissue_ratio at 0.5).
    """
    generator = load_generator(run, device)
    if Path(out).exists() and not overwrite:  # said now, not after minutes of sampling
        raise UnshortcutError(f"{out}: already exists (pass --overwrite to replace it)")
    source_path = Path(patches) if patches is not None else Path(generator.config.patches)
    source = PatchSet.open(source_path)
    _check_compatible(generator, source)
    table = source.table
    train = table.iloc[source.rows("train")]
    train_source = f"{source_path} (train split)"
    scheme = sampling_scheme(train, attributes, taus, train_source)
    check_generator_covers(scheme, generator.encoder, str(run))
    if isinstance(policy, str):
        policy = BalancePolicy.parse(policy)
    counts = plan_counts(scheme, train, train_source, groups=groups, count=count, policy=policy)
    if not counts:
        raise UnshortcutError(
            f"{source_path}: nothing to generate, the chosen groups already reach the target"
        )
    real_train = real_rows(source, "train")
    real = table.iloc[real_train].reset_index(drop=True)
    rng = np.random.default_rng([seed, _DONORS])
    names = list(scheme.group_names)
    draws = [
        draw_rows(real, scheme, names.index(n), k, rng, train_source) for n, k in counts.items()
    ]
    rows = assign_identities(draws, table["image_id"].to_numpy(), patches_per_image)

    total = len(rows)
    scaled = generator.sample(
        generator.encoder.encode(rows, "generated rows"),
        seed=derive_seed(seed, _NOISE),
        steps=steps,
        guidance_scale=guidance_scale,
        on_batch=None if on_progress is None else lambda done: on_progress("sample", done, total),
    )
    pixels = generator.scaling.inverse(scaled[:, : generator.image_channels])
    any_pixel_rule = source.manifest.get("parameters", {}).get("min_tumor_fraction") is None
    masks, from_donor = _masks(rows, scaled, generator, any_pixel_rule)

    report, files = _quality(
        generator, source, scheme, rows, pixels, masks, draws, seed, on_progress
    )
    generation = {
        "generator": str(Path(run).resolve()),
        "groups": scheme.to_dict(),
        "counts": counts,
        "donor_rules": {d.group: d.donor_rule for d in draws},
        "seed": seed,
        "steps": steps or generator.config.sample_steps,
        "guidance_scale": generator.config.guidance_scale
        if guidance_scale is None
        else guidance_scale,
        "patches_per_image": patches_per_image,
        "masks": "generated" if generator.config.with_mask else "uniform at the tumor fraction",
        "tumor_fraction_from_donor": from_donor,
        "quality": QUALITY_FILE,
    }
    files = {**files, QUALITY_FILE: (json.dumps(report, indent=2) + "\n").encode()}
    written = write_augmented_patch_set(
        source, Path(out), rows, pixels, masks, generation, files, overwrite=overwrite
    )
    return GenerationResult(written, counts, report)


def _identity(source: PatchSet) -> str:
    """Where the patch set is and which version of it (the judge cache key)."""
    table = source.path / TABLE_FILE
    return f"{source.path.resolve()}|{table.stat().st_mtime_ns}|{len(source)}"


def _check_compatible(generator: Generator, source: PatchSet) -> None:
    have = (source.channels, source.input_size, str(source.pixels.dtype))
    want = (generator.image_channels, generator.input_size, generator.scaling.dtype)
    if have != want:
        raise UnshortcutError(
            f"{source.path}: patches of {have[0]} channels, {have[1]} px, {have[2]} do not match "
            f"the generator's {want[0]} channels, {want[1]} px, {want[2]}"
        )


def _masks(
    rows: pd.DataFrame, scaled: np.ndarray, generator: Generator, any_pixel_rule: bool
) -> tuple[np.ndarray, int]:
    """Masks of the generated rows; sets their tumor fractions. Returns (masks, donor count).

    Under the default labelling rule (label 1 = any tumor pixel) a non-tumor patch
    has no tumor pixel, so its generated mask is cleared.
    """
    labels = rows["label"].to_numpy()
    size = generator.input_size
    if not generator.config.with_mask:
        fraction = rows["tumor_fraction"].to_numpy(np.float64)
        level = to_dtype(255.0 * fraction, np.dtype(np.uint8))
        return np.broadcast_to(level[:, None, None], (len(rows), size, size)).copy(), len(rows)
    masks = masks_inverse(scaled[:, generator.image_channels :])
    if any_pixel_rule:
        masks[labels == 0] = 0
    measured = masks.reshape(len(rows), -1).mean(axis=1) / 255.0
    from_donor = (labels == 1) & (measured == 0)
    rows["tumor_fraction"] = np.where(from_donor, rows["tumor_fraction"], measured)
    return masks, int(from_donor.sum())


def _quality(
    generator: Generator,
    source: PatchSet,
    scheme: GroupScheme,
    rows: pd.DataFrame,
    pixels: np.ndarray,
    masks: np.ndarray,
    draws: Sequence[GroupDraw],
    seed: int,
    on_progress: OnProgress | None,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Judge the generated patches against real training and validation patches."""
    table = source.table
    path = str(source.path)

    def labelled(split: str, limit: int, rng: np.random.Generator) -> LabelledRows:
        positions = real_rows(source, split)
        part = table.iloc[positions]
        bins = attribute_bins(scheme, part, path)
        want = targets(scheme, scheme.labels(part, path), bins)
        return read_rows(source.pixels, positions, scheme.group_index(part, path), want, limit, rng)

    rng = np.random.default_rng([seed, _QUALITY])
    positions = real_rows(source, "train")
    part = table.iloc[positions]
    if on_progress is not None:
        on_progress("judge", 0, 1)
    judge = cached_judge(
        generator.run / "judges",
        source.pixels,
        positions,
        scheme.labels(part, path),
        attribute_bins(scheme, part, path),
        scheme,
        generator.scaling,
        epochs=generator.config.quality_epochs,
        seed=generator.config.seed,
        device=generator.device,
        key=_identity(source),
    )
    if on_progress is not None:
        on_progress("judge", 1, 1)
    generated = LabelledRows(
        pixels,
        scheme.group_index(rows, "generated rows"),
        targets(scheme, scheme.labels(rows), attribute_bins(scheme, rows, "generated rows")),
    )
    return quality_report(
        judge,
        generated=generated,
        generated_masks=masks if generator.config.with_mask else None,
        train=labelled("train", MAX_REFERENCE_ROWS, rng),
        val=labelled("val", MAX_VAL_ROWS, rng),
        group_names=scheme.group_names,
        donor_rules={d.group: d.donor_rule for d in draws},
        seed=seed,
    )
