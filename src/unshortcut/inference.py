"""A run's data, inference, scoring and the predictions table.

Shared by training (validation every epoch, the final scoring), ``evaluate`` and
everything that scores a model on a patch set, so all of them bin, normalise, infer
and score exactly alike. Nothing here trains.

Only the splits a command needs are read: training loads train and val, and the
test split only once training is over; evaluation loads val and test with the run's
own group scheme and normalisation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from unshortcut import distributed
from unshortcut.data import Normalization, SplitData, channel_stats
from unshortcut.errors import UnshortcutError
from unshortcut.groups import NO_ATTRIBUTE, GroupScheme, fit_groups, parse_attribute_specs
from unshortcut.metrics import (
    PIXEL_COUNTS,
    attribute_decodability,
    evaluate_predictions,
    patch_dice_iou,
    per_attribute_metrics,
    robust_bins_per_class,
    segmentation_metrics,
)
from unshortcut.models import ModelOutput
from unshortcut.models.decoder import UNetDecoder
from unshortcut.rows import GroupedSplit
from unshortcut.stain import cached_normalized_store, check_brightfield, fit_on_patch_set
from unshortcut.tiling.patchset import PatchSet

SPLITS = ("train", "val", "test")
EVAL_BATCH = 256
THRESHOLD = 0.5
"""Tumor probability at and above which a patch is predicted tumor (metrics and tables)."""


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a torch device; anything else, or a
    CUDA device that is not there, is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UnshortcutError(
            f"--device: unknown device {name!r} (use auto, cpu or cuda)"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise UnshortcutError(f"--device: {name!r} is not supported (use auto, cpu or cuda)")
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise UnshortcutError(f"--device {name}: no such CUDA device is available")
    return device


@dataclass
class RunData:
    """A patch set seen through a run: groups, normalisation and per-split batches."""

    patchset: PatchSet
    scheme: GroupScheme
    normalization: Normalization
    robust_bins: list[list[int]]
    """Per class, the attribute bins where the shortcut points away from it (training split)."""
    device: torch.device
    tables: dict[str, pd.DataFrame]
    splits: dict[str, GroupedSplit]
    loaders: dict[str, SplitData]
    channels_last: bool = False
    """Batches in channels-last memory format (what the run's model was set up for)."""
    stained_pixels: np.ndarray | None = None
    """A stain-normalised copy of the pixel store (training), read instead of the store;
    None: the normalisation's stain step, if any, runs per batch."""

    @property
    def source(self) -> str:
        return str(self.patchset.path)

    def table(self, split: str) -> pd.DataFrame:
        """The rows of ``split`` in pixel-store order (read once, then kept)."""
        if split not in self.tables:
            rows = self.patchset.rows(split)
            self.tables[split] = self.patchset.table.iloc[rows].reset_index(drop=True)
        return self.tables[split]

    def load(self, split: str) -> None:
        """Prepare ``split``'s grouped rows and batches (no-op when already loaded)."""
        if split in self.loaders:
            return
        table = self.table(split)
        if not len(table):
            raise UnshortcutError(f"{self.source}: the {split} split has no patches")
        grouped = self.scheme.grouped_split(table, f"{self.source} ({split} split)")
        if split != "train" and len(np.unique(grouped.labels)) < grouped.n_classes:
            warnings.warn(
                f"{self.source}: the {split} split holds one class only; AUROC and robust "
                "AUROC are reported as null and balanced accuracy covers that class alone",
                stacklevel=2,
            )
        self.splits[split] = grouped
        stored = self.stained_pixels is not None
        self.loaders[split] = SplitData(
            self.stained_pixels if stored else self.patchset.pixels,
            self.patchset.masks,
            self.patchset.rows(split),
            grouped,
            self.normalization,
            self.device,
            self.channels_last,
            stain=None if stored else self.normalization.stain,
        )


def load_run_data(
    patches: Path,
    *,
    device: torch.device,
    splits: Sequence[str],
    attributes: Sequence[str] | None = None,
    taus: Sequence[float] = (),
    normalize: bool = True,
    stain_normalization: str = "none",
    scheme: GroupScheme | None = None,
    normalization: Normalization | None = None,
    robust_bins: list[list[int]] | None = None,
    channels_last: bool = False,
) -> RunData:
    """Open a patch set and prepare ``splits``.

    Training fits the group scheme (from ``attributes`` and ``taus``), the normalisation
    (``stain_normalization`` "macenko"/"reinhard" first, then the channel statistics of
    the stain-normalised pixels) and the robust-AUROC bins on the training split;
    scoring a finished run passes the run's own ``scheme``, ``normalization`` and
    ``robust_bins``, so any patch set is scored on the run's terms and its training
    split is never read.
    """
    patchset = PatchSet.open(patches)
    data = RunData(
        patchset,
        scheme,  # type: ignore[arg-type]  (fitted below when None)
        normalization,  # type: ignore[arg-type]
        robust_bins,  # type: ignore[arg-type]
        device,
        tables={},
        splits={},
        loaders={},
        channels_last=channels_last,
    )
    train_source = f"{data.source} (train split)"
    if scheme is None or normalization is None or robust_bins is None:
        if attributes is None and scheme is None:
            raise ValueError("load_run_data: give attributes to fit, or a fitted scheme")
        train = data.table("train")
        if not len(train):
            raise UnshortcutError(f"{data.source}: the training split has no patches")
        if scheme is None:
            specs = parse_attribute_specs(list(attributes or ()), list(taus))
            data.scheme = fit_groups(train, specs, source=train_source)
        if normalization is None:
            data.normalization = _fit_normalization(data, normalize, stain_normalization)
        if robust_bins is None:
            data.robust_bins = robust_bins_per_class(
                data.scheme.labels(train, train_source),
                data.scheme.attribute_index(train, train_source),
                data.scheme.n_classes,
                data.scheme.n_attributes,
            )
    if data.normalization.stain is not None:
        check_brightfield(patchset.manifest, data.source)
    for split in splits:
        data.load(split)
    return data


def _fit_normalization(data: RunData, normalize: bool, stain_method: str) -> Normalization:
    """Stain target and channel statistics of the training split, as the model sees it.

    The stain target is fitted on reference patches drawn with a fixed seed, so every
    run on a patch set shares one target and one cached normalised copy of the store:
    normalising costs far more than a training step, so it is done once, not per batch
    and epoch. The channel statistics are those of the normalised training pixels.
    """
    patchset = data.patchset
    stain = None
    if stain_method != "none":
        stain = fit_on_patch_set(
            patchset.pixels, patchset.table, patchset.manifest, stain_method, data.source
        )
        data.stained_pixels = cached_normalized_store(stain, patchset.pixels, patchset.path)
    if not normalize:
        identity = Normalization.identity(patchset.channels)
        return Normalization(identity.mean, identity.std, stain)
    pixels = patchset.pixels if data.stained_pixels is None else data.stained_pixels
    stats = channel_stats(pixels, patchset.rows("train"))
    return Normalization(stats.mean, stats.std, stain)


@torch.no_grad()
def _forward_all(
    model: nn.Module,
    loader: SplitData,
    pick: Callable[[ModelOutput], torch.Tensor],
    prefetch: bool,
    bf16: bool,
) -> np.ndarray:
    """``pick`` of the model's outputs for every row, in order, in eval mode (under bf16
    autocast when ``bf16``).

    Under data parallelism each rank scores a contiguous block of rows and the blocks are
    gathered, so every rank returns every row.
    """
    was_training = model.training
    model.eval()
    rows = distributed.contiguous_share(len(loader))
    out = []
    for batch in loader.sequential(EVAL_BATCH, prefetch, rows=rows):
        with torch.autocast(loader.device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(pick(model.outputs(batch.x)).cpu())
    model.train(was_training)
    return distributed.gather_rows(torch.cat(out).numpy() if out else None)


def log_probabilities(
    model: nn.Module, loader: SplitData, prefetch: bool = True, bf16: bool = False
) -> np.ndarray:
    """Class log-probabilities ``(N, K)`` of every row, in order, in float64.

    Computed from the logits in float64, so the per-row cross-entropy (and the mean
    loss in metrics.json) can be recomputed exactly from the stored probabilities.
    """
    return _forward_all(
        model, loader, lambda out: torch.log_softmax(out.logits.double(), dim=1), prefetch, bf16
    )


def features(
    model: nn.Module, loader: SplitData, prefetch: bool = True, bf16: bool = False
) -> np.ndarray:
    """Penultimate features ``(N, D)`` of every row, in order."""

    def pick(out: ModelOutput) -> torch.Tensor:
        if out.features is None:
            raise UnshortcutError("the model exposes no features (ModelOutput.features)")
        return out.features.float()

    return _forward_all(model, loader, pick, prefetch, bf16)


@dataclass
class Inference:
    """One pass over a split: class log-probabilities and, for models that predict a
    pixel map (and patch sets that store masks), each row's ``PIXEL_COUNTS``."""

    log_probs: np.ndarray
    """``(N, K)`` float64."""
    pixel_counts: np.ndarray | None = None
    """``(N, 3)`` int64: tumor, predicted and overlapping pixels, or ``None``."""


def pixel_counts(pixel_logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``PIXEL_COUNTS`` ``(B, 3)`` of tumor maps against masks, both binarised at 0.5:
    a pixel is predicted tumor when its tumor probability is >= THRESHOLD, and is tumor
    when at least half of it is (the mask stores the tumor fraction per input pixel)."""
    predicted = torch.softmax(pixel_logits.double(), dim=1)[:, 1] >= THRESHOLD
    tumor = masks >= 0.5
    return torch.stack(
        [tumor.sum(dim=(1, 2)), predicted.sum(dim=(1, 2)), (tumor & predicted).sum(dim=(1, 2))],
        dim=1,
    )


def predicts_pixels(model: nn.Module) -> bool:
    """Whether ``model`` (or the model a wrapper holds) has a pixel decoder."""
    return any(isinstance(m, UNetDecoder) for m in model.modules())


@torch.no_grad()
def infer(
    model: nn.Module, loader: SplitData, prefetch: bool = True, bf16: bool = False
) -> Inference:
    """Log-probabilities of every row and, where the model predicts a pixel map, the
    pixel counts of its map against the stored masks; streamed per batch (no map is
    kept). Masks are read only for pixel-map models. Rows are shared out and gathered as
    in :func:`log_probabilities`, so every rank returns every row.
    """
    was_training = model.training
    model.eval()
    with_masks = predicts_pixels(model) and loader.masks is not None
    rows = distributed.contiguous_share(len(loader))
    log_probs, counts = [], []
    for batch in loader.sequential(EVAL_BATCH, prefetch, rows=rows, with_masks=with_masks):
        with torch.autocast(loader.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model.outputs(batch.x)
        log_probs.append(torch.log_softmax(out.logits.double(), dim=1).cpu())
        if with_masks:
            counts.append(pixel_counts(out.pixel_logits, batch.mask).cpu())
    model.train(was_training)

    def gathered(blocks: list[torch.Tensor]) -> np.ndarray:
        return distributed.gather_rows(torch.cat(blocks).numpy() if blocks else None)

    return Inference(gathered(log_probs), gathered(counts) if with_masks else None)


@torch.no_grad()
def tumor_maps(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Per-pixel tumor probability ``(B, H, W)`` of normalised inputs ``(B, C, H, W)``,
    or ``None`` for a model without a pixel decoder.

    The decoder is fully convolutional, so ``H`` and ``W`` may exceed the training input
    size: a tile of a whole image (at the run's scale: patch size / input size) gives a
    map of its own size, without seams between patches.
    """
    was_training = model.training
    model.eval()
    out = model.outputs(x)
    model.train(was_training)
    if out.pixel_logits is None:
        return None
    return torch.softmax(out.pixel_logits.float(), dim=1)[:, 1]


def row_losses(log_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy of every row: ``-log p(label)``."""
    return -log_probs[np.arange(len(labels)), labels]


def score_split(
    data: RunData,
    split: str,
    log_probs: np.ndarray,
    *,
    bootstrap: int,
    seed: int,
    rows: np.ndarray | None = None,
    pixel_counts: np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics of ``split`` (see unshortcut.metrics) plus the mean cross-entropy "loss",
    and "segmentation" (Dice, IoU per group) when ``pixel_counts`` are given.

    ``rows`` restricts scoring to those rows of the split (validation rows a method
    did not train on); default all.
    """
    grouped = data.splits[split]
    if rows is not None:
        grouped = grouped.subset(rows)
        log_probs = log_probs[rows]
        pixel_counts = None if pixel_counts is None else pixel_counts[rows]
    metrics = evaluate_predictions(
        labels=grouped.labels,
        scores=np.exp(log_probs[:, 1]),
        attributes=grouped.attributes,
        image_ids=grouped.image_ids,
        group_names=list(data.scheme.group_names),
        n_attributes=grouped.n_attributes,
        robust_bins_by_class=data.robust_bins,
        threshold=THRESHOLD,
        n_bootstrap=bootstrap,
        seed=seed,
    )
    metrics["per_attribute"] = per_attribute_metrics(
        labels=grouped.labels,
        scores=np.exp(log_probs[:, 1]),
        attributes=grouped.attributes,
        bin_counts=grouped.bin_counts,
        bin_names=[a.bin_names for a in data.scheme.attributes],
        columns=[a.column for a in data.scheme.attributes],
        threshold=THRESHOLD,
    )
    metrics["loss"] = float(row_losses(log_probs, grouped.labels).mean())
    if pixel_counts is not None:
        metrics["segmentation"] = segmentation_metrics(
            pixel_counts, grouped.groups, list(data.scheme.group_names), data.patchset.input_size**2
        )
    one_class = one_class_warning(grouped.labels, np.exp(log_probs[:, 1]), data.scheme.class_names)
    if one_class is not None:
        metrics["warnings"] = [*metrics.get("warnings", []), one_class]
    return metrics


def decodability(
    data: RunData, model: nn.Module, *, seed: int, prefetch: bool = True
) -> dict[str, dict[str, Any]]:
    """Per attribute of the run's groups: how well a linear probe on the features the
    model's head reads (``ModelOutput.features``) recovers it, fitted on validation and
    scored on test (:func:`unshortcut.metrics.attribute_decodability`).

    Continuous attributes are probed on their raw values, categorical ones on their
    categories. A method that removes an attribute from the task representation should
    bring the AUROC towards 0.5.
    """
    if not data.scheme.attributes:
        return {}
    fit, scored = data.splits["val"], data.splits["test"]
    fit_features = features(model, data.loaders["val"], prefetch)
    score_features = features(model, data.loaders["test"], prefetch)
    return {
        attribute.column: attribute_decodability(
            fit_features=fit_features,
            fit_target=_raw_values(fit)[:, j],
            score_features=score_features,
            score_target=_raw_values(scored)[:, j],
            score_labels=scored.labels,
            continuous=fit.continuous[j],
            seed=seed,
        )
        for j, attribute in enumerate(data.scheme.attributes)
    }


def _raw_values(split: GroupedSplit) -> np.ndarray:
    """``(n, d)`` raw attribute values (the category index for categorical ones)."""
    return split.bins.astype(np.float64) if split.values is None else split.values


def method_splits(
    data: RunData, attributes: Sequence[str], taus: Sequence[float]
) -> dict[str, GroupedSplit]:
    """The training and validation rows grouped by a method's own attributes.

    A run may train a method with other groups than it reports (``method_attributes``:
    GERNE on the tissue ratio alone, scored on tissue x site intersections). The bins
    are fitted on the training split, as the run's own; the rows and their order are
    the run's, so a method indexes them exactly like ``data.splits``. ``taus`` apply to
    bare names among ``attributes`` (they are the run's ``--tau`` values, which need not
    concern the method's attributes).
    """
    bare = any(":" not in text and text != NO_ATTRIBUTE for text in attributes)
    specs = parse_attribute_specs(list(attributes), list(taus) if bare else [])
    source = f"{data.source} (train split, method attributes)"
    scheme = fit_groups(data.table("train"), specs, source=source)
    return {
        split: scheme.grouped_split(data.table(split), f"{data.source} ({split} split)")
        for split in ("train", "val")
    }


def one_class_warning(
    labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str]
) -> str | None:
    """Say so when every patch of a split with both classes gets the same prediction.

    That is what plain ERM does on tumor-poor sets (balanced accuracy 50%, worst-group
    accuracy 0%): the majority class everywhere. The numbers alone look like a bad
    model; the warning names the cause and the options that address it.
    """
    predicted = np.unique(scores >= THRESHOLD)
    if len(predicted) != 1 or len(np.unique(labels)) < 2:
        return None
    name = class_names[int(predicted[0])]
    tumor_share = float(np.mean(labels == 1))
    return (
        f"the model predicts {name} for every patch ({tumor_share:.1%} of them are tumor), "
        "so balanced accuracy is 50% and worst-group accuracy 0%. On tumor-poor data this "
        "is class imbalance; class-balanced batches address it (--method cb_erm, or "
        "resample/reweight/groupdro for groups too): see docs/training.md#class-imbalance"
    )


def predictions_table(
    data: RunData,
    split: str,
    log_probs: np.ndarray,
    trained_on: np.ndarray | None = None,
    pixel_counts: np.ndarray | None = None,
) -> pd.DataFrame:
    """Contract 3.4 predictions: enough to recompute every metric, the loss included.

    ``prediction`` is ``score >= THRESHOLD``, the rule the metrics use; ``loss`` the
    row's cross-entropy; ``trained_on`` marks rows the method fitted on (DFR's half of
    validation), which scoring leaves out. With ``pixel_counts`` (pixel-map models) also
    the row's ``PIXEL_COUNTS`` and its ``dice`` and ``iou`` (NaN where neither the map
    nor the mask holds tumor), from which "segmentation" recomputes.
    """
    grouped = data.splits[split]
    table = data.table(split)
    attribute_names = np.asarray(data.scheme.attribute_names, dtype=object)
    group_names = np.asarray(data.scheme.group_names, dtype=object)
    score = np.exp(log_probs[:, 1])
    marked = np.zeros(len(grouped), dtype=bool)
    if trained_on is not None:
        marked[trained_on] = True
    segmentation: dict[str, np.ndarray] = {}
    if pixel_counts is not None:
        dice, iou = patch_dice_iou(pixel_counts)
        segmentation = dict(zip(PIXEL_COUNTS, pixel_counts.T, strict=True))
        segmentation |= {"dice": dice, "iou": iou}
    return pd.DataFrame(
        {
            "patch_id": table["patch_id"].to_numpy(),
            "image_id": table["image_id"].to_numpy(),
            "label": grouped.labels,
            "group": group_names[grouped.groups],
            "attribute": attribute_names[grouped.attributes],
            "score": score,
            "prediction": (score >= THRESHOLD).astype(np.int64),
            "loss": row_losses(log_probs, grouped.labels),
            "trained_on": marked,
            **segmentation,
        }
    )
