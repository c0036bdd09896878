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
from unshortcut.groups import GroupScheme, fit_groups, parse_attribute_specs
from unshortcut.metrics import evaluate_predictions, robust_bins_per_class
from unshortcut.models import ModelOutput
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
) -> dict[str, Any]:
    """Metrics of ``split`` (see unshortcut.metrics) plus the mean cross-entropy "loss".

    ``rows`` restricts scoring to those rows of the split (validation rows a method
    did not train on); default all.
    """
    grouped = data.splits[split]
    if rows is not None:
        grouped = grouped.subset(rows)
        log_probs = log_probs[rows]
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
    metrics["loss"] = float(row_losses(log_probs, grouped.labels).mean())
    one_class = one_class_warning(grouped.labels, np.exp(log_probs[:, 1]), data.scheme.class_names)
    if one_class is not None:
        metrics["warnings"] = [*metrics.get("warnings", []), one_class]
    return metrics


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
    data: RunData, split: str, log_probs: np.ndarray, trained_on: np.ndarray | None = None
) -> pd.DataFrame:
    """Contract 3.4 predictions: enough to recompute every metric, the loss included.

    ``prediction`` is ``score >= THRESHOLD``, the rule the metrics use; ``loss`` the
    row's cross-entropy; ``trained_on`` marks rows the method fitted on (DFR's half of
    validation), which scoring leaves out.
    """
    grouped = data.splits[split]
    table = data.table(split)
    attribute_names = np.asarray(data.scheme.attribute_names, dtype=object)
    group_names = np.asarray(data.scheme.group_names, dtype=object)
    score = np.exp(log_probs[:, 1])
    marked = np.zeros(len(grouped), dtype=bool)
    if trained_on is not None:
        marked[trained_on] = True
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
        }
    )
