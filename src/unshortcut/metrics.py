"""Metrics for binary tumor classification under a shortcut, with cluster-bootstrap CIs.

Definitions follow ARCHITECTURE section 4 and docs/metrics.md; they must not drift.
Patches of one image share stain, scanner, tissue and annotator, so they are not
independent samples: the confidence intervals resample *images* with replacement
(a cluster bootstrap) instead of patches, which would make intervals far too narrow.

Every accuracy metric is a function of per-image, per-group counts of correct and
total patches, and a bootstrap replicate is a vector of multinomial image weights.
So the point estimate (all weights 1) and all replicates come out of one matrix
product ``weights (B, n_images) @ counts (n_images, n_groups)``, and the two can
never disagree. AUROC uses the same weights per patch in a sorted-rank formulation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from unshortcut.errors import UnshortcutError
from unshortcut.groups import CLASS_NAMES

SELECTION_CRITERIA: tuple[str, ...] = (
    "worst_group_accuracy",
    "balanced_accuracy",
    "group_balanced_accuracy",
    "accuracy",
    "worst_class_accuracy",
    "loss",
)
CI_METRICS: tuple[str, ...] = (
    "worst_group_accuracy",
    "balanced_accuracy",
    "group_balanced_accuracy",
    "accuracy",
    "auroc",
    "robust_auroc",
)
ECE_BINS = 15
CONFIDENCE = 0.95
MIN_DEFINED_SHARE = 0.5
"""Below this share of defined bootstrap replicates a metric gets no interval."""
_CHUNK_ELEMENTS = 1_000_000  # replicates per chunk times patches (AUROC) or images


def robust_bins_per_class(
    labels: np.ndarray, attributes: np.ndarray, n_classes: int, n_attributes: int
) -> list[list[int]]:
    """For each class, the attribute bins where the shortcut points away from it.

    That is where the class is least represented relative to the other classes: its
    share of the bin's rows, ``n_ya / n_a`` (bins without rows ignored), is lowest; ties
    give several bins. Callers pass the training split: for tumor vs tissue ratio this
    is the small-tissue bin for tumor and the large-tissue bin for non-tumor, whatever
    the bins' sizes (ARCHITECTURE section 4: never simply the bin with fewest rows).
    """
    counts = np.bincount(
        np.asarray(labels) * n_attributes + np.asarray(attributes),
        minlength=n_classes * n_attributes,
    ).reshape(n_classes, n_attributes)
    totals = counts.sum(axis=0)
    filled = totals > 0
    bins = []
    for label, row in enumerate(counts):
        if not row.any():
            raise ValueError(f"robust_bins_per_class: no rows of class {label}")
        share = np.where(filled, row / np.maximum(totals, 1), np.inf)
        bins.append(np.flatnonzero(np.isclose(share, share.min(), rtol=0, atol=1e-12)).tolist())
    return bins


def evaluate_predictions(
    *,
    labels: np.ndarray,
    scores: np.ndarray,
    attributes: np.ndarray,
    image_ids: np.ndarray,
    group_names: Sequence[str],
    n_attributes: int,
    robust_bins_by_class: Sequence[Sequence[int]],
    threshold: float = 0.5,
    n_bootstrap: int = 1000,
    seed: int = 0,
    min_group_size: int = 30,
) -> dict[str, Any]:
    """All metrics of one split as a JSON-ready dict (floats, ``None`` where undefined).

    ``labels`` are 0/1, ``scores`` the tumor probability, prediction ``score >= threshold``.
    ``group_names`` follow ``group = label * n_attributes + attribute``.
    ``robust_bins_by_class`` comes from :func:`robust_bins_per_class` on the training
    split. Intervals are 95% percentile intervals of ``n_bootstrap``
    image-level resamples drawn from ``seed``.
    """
    labels = np.asarray(labels).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    attributes = np.asarray(attributes).astype(np.int64)
    n_classes, n_groups = len(CLASS_NAMES), len(group_names)
    _check_inputs(
        labels, scores, attributes, image_ids, n_groups, n_attributes, robust_bins_by_class
    )
    groups = labels * n_attributes + attributes
    images, image_index = np.unique(np.asarray(image_ids), return_inverse=True)
    n_images = len(images)
    correct = (scores >= threshold) == (labels == 1)

    cell = image_index * n_groups + groups
    group_total = np.bincount(cell, minlength=n_images * n_groups).reshape(n_images, n_groups)
    group_correct = np.bincount(cell, weights=correct, minlength=n_images * n_groups).reshape(
        n_images, n_groups
    )
    positive = labels == 1
    robust = np.zeros(len(labels), dtype=bool)
    for label, bins in enumerate(robust_bins_by_class):
        robust |= (labels == label) & np.isin(attributes, bins)

    auroc = _WeightedAuroc(scores, positive, image_index)
    robust_auroc = _WeightedAuroc(scores[robust], positive[robust], image_index[robust])

    n_per_group = group_total.sum(axis=0)
    present = n_per_group > 0

    def family(weights: np.ndarray) -> dict[str, np.ndarray]:
        values = _accuracy_family(
            weights @ group_correct, weights @ group_total, n_classes, present
        )
        values["auroc"] = auroc(weights)
        values["robust_auroc"] = robust_auroc(weights)
        return values

    point = {name: _scalar(v[0]) for name, v in family(np.ones((1, n_images))).items()}
    result: dict[str, Any] = {"n": len(labels), "n_images": n_images}
    result["threshold"] = float(threshold)
    result |= {name: point[name] for name in (*CI_METRICS, "worst_class_accuracy")}
    result |= _worst_group_auroc(scores, groups, group_names, n_attributes)
    result["ece"] = _ece(scores, labels)
    result["groups"] = {
        name: {
            "n": int(n_per_group[g]),
            "n_images": int((group_total[:, g] > 0).sum()),
            "accuracy": _scalar(group_correct[:, g].sum() / n_per_group[g])
            if n_per_group[g]
            else None,
            "ece": _ece(scores[groups == g], labels[groups == g]),
        }
        for g, name in enumerate(group_names)
    }
    warnings = _sample_warnings(n_per_group, group_names, n_attributes, min_group_size)
    warnings += one_class_warnings(labels, scores >= threshold)
    if result["robust_auroc"] is None:
        warnings.append(
            "robust_auroc is undefined: no tumor patches in the bins where tumor is rarest, "
            "or no non-tumor patches in the bins where non-tumor is rarest"
        )

    result |= {f"{name}_ci": None for name in CI_METRICS}
    result["ci_notes"] = {}
    if n_bootstrap and n_images < 2:
        reason = (
            f"{n_images} image in the split: an image-level bootstrap needs at least 2, "
            "so there is no interval"
        )
        result["ci_notes"] = dict.fromkeys(CI_METRICS, reason)
        warnings.append(reason)
    elif n_bootstrap:
        rng = np.random.default_rng(seed)
        step = max(1, _CHUNK_ELEMENTS // n_images)  # bounds memory for many small images
        chunks, replicate_totals = [], []
        for start in range(0, n_bootstrap, step):
            weights = _image_weights(rng, n_images, min(step, n_bootstrap - start))
            chunks.append(family(weights))
            replicate_totals.append(weights @ group_total)
        for name in CI_METRICS:
            values = np.concatenate([c[name] for c in chunks])
            interval, note = _percentile_interval(values, name, point[name] is not None)
            result[f"{name}_ci"] = interval
            if note:
                result["ci_notes"][name] = note
        warnings += _bootstrap_warnings(np.concatenate(replicate_totals), group_names, n_attributes)
        if n_images < 10:
            warnings.append(
                f"only {n_images} image(s): bootstrap intervals over so few images are unreliable"
            )
    result["bootstrap"] = {
        "replicates": n_bootstrap,
        "unit": "image",
        "confidence": CONFIDENCE,
        "seed": int(seed),
    }
    result["warnings"] = warnings
    return result


def attribute_bins(attributes: np.ndarray, bin_counts: Sequence[int]) -> np.ndarray:
    """``(n, d)`` per-attribute bins from the intersectional index (mixed radix, first
    attribute most significant: the inverse of ``unshortcut.rows.intersection_index``)."""
    attributes = np.asarray(attributes, dtype=np.int64)
    columns = []
    place = math.prod(bin_counts)
    for count in bin_counts:
        place //= count
        columns.append((attributes // place) % count)
    return np.stack(columns, axis=1) if columns else np.zeros((len(attributes), 0), np.int64)


def per_attribute_metrics(
    *,
    labels: np.ndarray,
    scores: np.ndarray,
    attributes: np.ndarray,
    bin_counts: Sequence[int],
    bin_names: Sequence[Sequence[str]],
    columns: Sequence[str],
    threshold: float = 0.5,
) -> dict[str, dict[str, Any]]:
    """Accuracy over label x bins of each attribute alone (not their intersections).

    With several attributes the headline worst-group accuracy is over the intersections
    (label x tissue bin x site ...); this says which attribute a model's errors follow.
    Per column: ``worst_group_accuracy`` and ``group_balanced_accuracy`` over that
    column's non-empty groups, and ``groups`` (every group, empty ones with n = 0 and
    accuracy ``None``), named like ``tumor|site=B``. Computed from the same inputs as
    :func:`evaluate_predictions` (the intersectional index decomposes into the bins), so
    it recomputes from ``predictions/``; no intervals.
    """
    labels = np.asarray(labels).astype(np.int64)
    correct = (np.asarray(scores, dtype=np.float64) >= threshold) == (labels == 1)
    bins = attribute_bins(attributes, bin_counts)
    result: dict[str, dict[str, Any]] = {}
    for j, column in enumerate(columns):
        n_bins = int(bin_counts[j])
        group = labels * n_bins + bins[:, j]
        size = np.bincount(group, minlength=len(CLASS_NAMES) * n_bins)
        hits = np.bincount(group, weights=correct, minlength=len(size))
        present = size > 0
        accuracy = np.divide(hits, size, out=np.full(len(size), np.nan), where=present)
        names = [f"{c}|{b}" for c in CLASS_NAMES for b in bin_names[j]]
        result[column] = {
            "worst_group_accuracy": _scalar(accuracy[present].min()) if present.any() else None,
            "group_balanced_accuracy": (
                _scalar(accuracy[present].mean()) if present.any() else None
            ),
            "groups": {
                name: {"n": int(size[g]), "accuracy": _scalar(accuracy[g]) if size[g] else None}
                for g, name in enumerate(names)
            },
        }
    return result


PROBE_MAX_ROWS = 5000
"""Rows per split a decodability probe fits on or scores (a seeded subsample above it)."""


def attribute_decodability(
    *,
    fit_features: np.ndarray,
    fit_target: np.ndarray,
    score_features: np.ndarray,
    score_target: np.ndarray,
    score_labels: np.ndarray,
    continuous: bool,
    seed: int = 0,
    max_rows: int = PROBE_MAX_ROWS,
) -> dict[str, Any]:
    """How well a linear probe reads one attribute from a model's features.

    The probe (standardised features, L2 logistic regression, scikit-learn defaults) is
    fitted on one split's features (validation) and scored on another's (test), so it
    measures what the representation holds, not what a probe can memorise.

    - categorical ``target`` (category index): ``auroc`` is the mean one-vs-rest AUROC
      over the categories both splits hold (for two categories, the plain AUROC);
    - continuous ``target``: the probe predicts "above the fitting split's median"
      (``auroc``); ``r2`` is the test R^2 of a ridge regression on the raw value.

    ``auroc_within_class`` is the same AUROC within each class label, averaged over the
    classes: when the label and the attribute are correlated, features that hold the
    label alone already decode the attribute, and this part says what they hold beyond
    it. 0.5 means nothing is decodable. ``None`` (with a ``note``) where a split lacks
    a second category.
    """
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    fit_rows = _bounded(len(fit_target), max_rows, rng)
    score_rows = _bounded(len(score_target), max_rows, rng)
    x_fit, x_score = fit_features[fit_rows], score_features[score_rows]
    raw_fit = np.asarray(fit_target, dtype=np.float64)[fit_rows]
    raw_score = np.asarray(score_target, dtype=np.float64)[score_rows]
    labels = np.asarray(score_labels)[score_rows]
    result: dict[str, Any] = {"n_fit": len(fit_rows), "n_scored": len(score_rows)}
    if continuous:
        median = float(np.median(raw_fit))
        result["target"] = f"above the fitting split's median ({median:.4g})"
        y_fit, y_score = (raw_fit > median).astype(np.int64), (raw_score > median).astype(np.int64)
        ridge = make_pipeline(StandardScaler(), Ridge()).fit(x_fit, raw_fit)
        result["r2"] = float(r2_score(raw_score, ridge.predict(x_score)))
    else:
        result["target"] = "categories"
        y_fit, y_score = raw_fit.astype(np.int64), raw_score.astype(np.int64)
    classes = np.unique(y_fit)
    if len(classes) < 2:
        return result | {
            "auroc": None,
            "auroc_within_class": None,
            "note": "the fitting split holds one value of the attribute",
        }
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(x_fit, y_fit)
    proba = probe.predict_proba(x_score)
    auroc = _mean_ovr_auroc(y_score, proba, classes)
    within = [
        _mean_ovr_auroc(y_score[labels == y], proba[labels == y], classes)
        for y in np.unique(labels)
    ]
    defined = [v for v in within if v is not None]
    return result | {
        "auroc": auroc,
        "auroc_within_class": float(np.mean(defined)) if defined else None,
        "note": None if auroc is not None else "the scored split holds one value of the attribute",
    }


def _bounded(n: int, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= max_rows else np.sort(rng.choice(n, max_rows, replace=False))


def _mean_ovr_auroc(target: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float | None:
    """Mean over categories of AUROC(category vs rest); those absent (or alone) skipped."""
    values = []
    for column, category in enumerate(classes):
        positive = target == category
        if positive.any() and not positive.all():
            scorer = _WeightedAuroc(proba[:, column], positive, np.zeros(len(target), np.int64))
            values.append(float(scorer(np.ones((1, 1)))[0]))
    return float(np.mean(values)) if values else None


def image_bootstrap_auroc(
    labels: np.ndarray,
    scores: np.ndarray,
    image_ids: np.ndarray,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> tuple[float | None, list[float] | None]:
    """AUROC of any score for 0/1 ``labels`` and its 95% image-level bootstrap interval.

    The estimator behind ``auroc`` and ``auroc_ci`` of :func:`evaluate_predictions`,
    for scores that are not a model's (the audit scores the label with an attribute
    alone). ``None`` where a class is absent; no interval when ``n_bootstrap`` is 0.
    """
    positive = np.asarray(labels) == 1
    _, image_index = np.unique(np.asarray(image_ids), return_inverse=True)
    n_images = int(image_index.max()) + 1 if len(image_index) else 0
    auroc = _WeightedAuroc(np.asarray(scores, dtype=np.float64), positive, image_index)
    point = _scalar(auroc(np.ones((1, n_images)))[0])
    if point is None or not n_bootstrap:
        return point, None
    replicates = auroc(_image_weights(np.random.default_rng(seed), n_images, n_bootstrap))
    finite = replicates[np.isfinite(replicates)]  # replicates that lack a class are left out
    if not finite.size:
        return point, None
    interval = np.percentile(finite, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    return point, [float(v) for v in interval]


def _image_weights(rng: np.random.Generator, n_images: int, n_bootstrap: int) -> np.ndarray:
    """How often each image is drawn, (n_bootstrap, n_images): n_images draws with replacement."""
    draws = rng.integers(0, n_images, size=(n_bootstrap, n_images))
    draws += np.arange(n_bootstrap)[:, None] * n_images
    counts = np.bincount(draws.ravel(), minlength=n_bootstrap * n_images)
    return counts.reshape(n_bootstrap, n_images).astype(np.float64)


def _check_inputs(
    labels: np.ndarray,
    scores: np.ndarray,
    attributes: np.ndarray,
    image_ids: np.ndarray,
    n_groups: int,
    n_attributes: int,
    robust_bins_by_class: Sequence[Sequence[int]],
) -> None:
    """Shape and range checks; violations are caller bugs except non-finite scores."""
    n = len(labels)
    if n == 0:
        raise ValueError("evaluate_predictions: no rows")
    if not len(scores) == len(attributes) == len(image_ids) == n:
        raise ValueError("evaluate_predictions: labels, scores, attributes, image_ids differ")
    if n_groups != len(CLASS_NAMES) * n_attributes:
        raise ValueError(f"evaluate_predictions: {n_groups} group names for 2 x {n_attributes}")
    if len(robust_bins_by_class) != len(CLASS_NAMES):
        raise ValueError("evaluate_predictions: robust_bins_by_class needs bins per class")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("evaluate_predictions: labels must be 0 or 1")
    if attributes.min() < 0 or attributes.max() >= n_attributes:
        raise ValueError(f"evaluate_predictions: attributes must lie in 0..{n_attributes - 1}")
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise UnshortcutError(f"scores: {bad} non-finite value(s) (did training diverge?)")


def _percentile_interval(
    replicates: np.ndarray, name: str, defined: bool
) -> tuple[list[float] | None, str | None]:
    """The 95% percentile interval of the replicates where ``name`` is defined, and a note.

    A replicate that lacks a group or class present in the split leaves worst-group,
    group-balanced and balanced accuracy (or AUROC) undefined, not "computed over what
    is left": it is dropped. When fewer than half the replicates remain, the interval
    would describe a different population, so there is none.
    """
    if not defined:
        return None, None
    finite = replicates[np.isfinite(replicates)]
    dropped = len(replicates) - len(finite)
    if len(finite) < MIN_DEFINED_SHARE * len(replicates):
        return None, (
            f"{dropped} of {len(replicates)} bootstrap replicates lack a group or class that "
            f"{name} needs, so there is no interval"
        )
    interval = np.percentile(finite, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    note = None
    if dropped:
        note = (
            f"interval from the {len(finite)} of {len(replicates)} replicates where {name} is "
            "defined (the others lack a group or class)"
        )
    return [float(v) for v in interval], note


def _accuracy_family(
    group_correct: np.ndarray, group_total: np.ndarray, n_classes: int, present: np.ndarray
) -> dict[str, np.ndarray]:
    """Accuracy metrics per replicate from (B, n_groups) correct/total counts.

    ``present`` marks the groups the split holds. Groups the split lacks are left out
    (the point estimate's definition); a replicate that lacks a group (class) the split
    holds leaves the worst-group and group-balanced (balanced, worst-class) accuracy
    undefined: NaN.
    """
    b = len(group_total)
    class_correct = group_correct.reshape(b, n_classes, -1).sum(axis=2)
    class_total = group_total.reshape(b, n_classes, -1).sum(axis=2)
    class_present = present.reshape(n_classes, -1).any(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        group_acc = (group_correct / group_total)[:, present]
        recall = (class_correct / class_total)[:, class_present]
        return {
            "accuracy": group_correct.sum(axis=1) / group_total.sum(axis=1),
            "balanced_accuracy": recall.mean(axis=1),
            "worst_class_accuracy": recall.min(axis=1),
            "group_balanced_accuracy": group_acc.mean(axis=1),
            "worst_group_accuracy": group_acc.min(axis=1),
        }


class _WeightedAuroc:
    """AUROC per row of bootstrap weights (B, n_images); each patch carries its image's weight.

    Mann-Whitney form: sum over (positive i, negative j) of w_i w_j ([s_i > s_j] +
    [s_i = s_j] / 2), divided by (sum of positive weights)(sum of negative weights).
    The negatives are sorted once; then the negative weight below (and tied with) each
    positive is a cumulative sum read at fixed positions, so a replicate costs O(n)
    and chunks of replicates run as arrays. NaN where a class has no weight.
    """

    def __init__(self, scores: np.ndarray, positive: np.ndarray, image_index: np.ndarray) -> None:
        negative = ~positive
        order = np.argsort(scores[negative], kind="stable")
        neg_scores = scores[negative][order]
        self.neg_image = image_index[negative][order]
        self.pos_image = image_index[positive]
        self.below = np.searchsorted(neg_scores, scores[positive], side="left")
        self.at_or_below = np.searchsorted(neg_scores, scores[positive], side="right")

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        result = np.full(len(weights), np.nan)
        if not (len(self.pos_image) and len(self.neg_image)):
            return result
        step = max(1, _CHUNK_ELEMENTS // (len(self.pos_image) + len(self.neg_image)))
        for start in range(0, len(weights), step):
            w = weights[start : start + step]
            cum_neg = np.zeros((len(w), len(self.neg_image) + 1))
            np.cumsum(w[:, self.neg_image], axis=1, out=cum_neg[:, 1:])
            w_pos = w[:, self.pos_image]
            halves = cum_neg[:, self.below] + cum_neg[:, self.at_or_below]
            wins = np.einsum("ij,ij->i", w_pos, halves) / 2
            with np.errstate(invalid="ignore", divide="ignore"):
                result[start : start + step] = wins / (w_pos.sum(axis=1) * cum_neg[:, -1])
        return result


def _worst_group_auroc(
    scores: np.ndarray, groups: np.ndarray, group_names: Sequence[str], n_attributes: int
) -> dict[str, Any]:
    """Minimum AUROC over pairs (tumor group, non-tumor group), both non-empty.

    Each pair asks: does the model rank tumor patches of one attribute bin above
    non-tumor patches of another? The worst pair exposes a model that separates
    classes only through the attribute.
    """
    worst: tuple[float, list[str]] | None = None
    present = set(np.unique(groups).tolist())
    for pos_group in range(n_attributes, 2 * n_attributes):
        for neg_group in range(n_attributes):
            if pos_group not in present or neg_group not in present:
                continue
            pair = (groups == pos_group) | (groups == neg_group)
            one_image = np.zeros(int(pair.sum()), dtype=np.int64)
            value = _WeightedAuroc(scores[pair], groups[pair] == pos_group, one_image)(
                np.ones((1, 1))
            )[0]
            if worst is None or value < worst[0]:
                worst = (float(value), [group_names[pos_group], group_names[neg_group]])
    if worst is None:
        return {"worst_group_auroc": None, "worst_group_auroc_groups": None}
    return {"worst_group_auroc": worst[0], "worst_group_auroc_groups": worst[1]}


def _ece(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Expected calibration error of the tumor probability in 15 equal-width bins.

    ECE = sum over bins of (n_bin / n) |mean label - mean score|; bin edges as in
    ``sklearn.calibration.calibration_curve(strategy="uniform")`` (right-closed).
    """
    if len(scores) == 0:
        return None
    inner_edges = np.linspace(0.0, 1.0, ECE_BINS + 1)[1:-1]
    bins = np.searchsorted(inner_edges, scores, side="left")
    gap = np.bincount(bins, weights=labels - scores, minlength=ECE_BINS)
    return float(np.abs(gap).sum() / len(scores))


#: A model that gives one class to at least this share of the patches...
ONE_CLASS_SHARE = 0.98
#: ...while finding at most this share of the other class's patches has collapsed
#: (judged when the split holds at least ONE_CLASS_MIN_OTHERS of them).
ONE_CLASS_RECALL = 0.1
ONE_CLASS_MIN_OTHERS = 3


def one_class_warnings(labels: np.ndarray, predicted: np.ndarray) -> list[str]:
    """A model that predicts (nearly) one class for everything, in words, with what to do.

    Such a model scores balanced accuracy near 50 and looks merely weak in a table;
    on tumor-poor data ERM ends up there. ``predicted`` is the 0/1 (bool) prediction.
    """
    labels, predicted = np.asarray(labels), np.asarray(predicted).astype(bool)
    n = len(labels)
    for c, other in ((1, 0), (0, 1)):
        share = float(np.mean(predicted == bool(c))) if n else 0.0
        others = labels == other
        if share < ONE_CLASS_SHARE or others.sum() < ONE_CLASS_MIN_OTHERS:
            continue
        recall = float(np.mean(predicted[others] == bool(other)))
        if recall <= ONE_CLASS_RECALL:
            return [
                f"the model predicts {CLASS_NAMES[c]} for {share:.1%} of the {n} patches and "
                f"finds {recall:.0%} of the {int(others.sum())} {CLASS_NAMES[other]} ones: it "
                "has collapsed to one class (balanced accuracy near 50). Train with "
                "class-balanced batches (--method cb_erm or resample), check the labels, or "
                "lower --lr"
            ]
    return []


def _sample_warnings(
    n_per_group: np.ndarray, group_names: Sequence[str], n_attributes: int, min_group_size: int
) -> list[str]:
    warnings = []
    for name, n in zip(group_names, n_per_group, strict=True):
        if n == 0:
            warnings.append(
                f"group {name} has no samples: it is left out of worst-group and "
                "group-balanced accuracy"
            )
        elif n < min_group_size:
            warnings.append(
                f"group {name} has {n} samples (< {min_group_size}): its accuracy is unreliable"
            )
    for label, class_name in enumerate(CLASS_NAMES):
        if not n_per_group[label * n_attributes : (label + 1) * n_attributes].any():
            warnings.append(
                f"class {class_name} is absent: balanced accuracy covers the other class "
                "only and AUROC is undefined"
            )
    return warnings


def _bootstrap_warnings(
    replicate_totals: np.ndarray, group_names: Sequence[str], n_attributes: int
) -> list[str]:
    """Name groups and classes missing from some replicates (left out there)."""
    present = replicate_totals.sum(axis=0) > 0
    b = len(replicate_totals)
    warnings = []
    lacking_groups = (replicate_totals == 0) & present
    for g in np.flatnonzero(lacking_groups.any(axis=0)):
        warnings.append(
            f"bootstrap: {int(lacking_groups[:, g].sum())} of {b} replicates lack group "
            f"{group_names[g]} (worst-group and group-balanced accuracy are undefined there "
            "and left out of their intervals)"
        )
    class_totals = replicate_totals.reshape(b, len(CLASS_NAMES), n_attributes).sum(axis=2)
    for label in np.flatnonzero(((class_totals == 0) & (class_totals.sum(axis=0) > 0)).any(0)):
        warnings.append(
            f"bootstrap: {int((class_totals[:, label] == 0).sum())} of {b} replicates lack "
            f"class {CLASS_NAMES[label]} (balanced accuracy and AUROC are undefined there "
            "and left out of their intervals)"
        )
    return warnings


PIXEL_COUNTS: tuple[str, ...] = ("tumor_pixels", "predicted_pixels", "overlap_pixels")
"""Per-patch pixel counts of a tumor map against the mask (both binarised at 0.5)."""


def patch_dice_iou(pixel_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dice ``2|P & T| / (|P| + |T|)`` and IoU ``|P & T| / |P | T|`` of every patch from
    its ``PIXEL_COUNTS`` ``(n, 3)``; NaN where neither map holds a tumor pixel."""
    tumor, predicted, overlap = np.asarray(pixel_counts, dtype=np.float64).T
    union = tumor + predicted - overlap
    with np.errstate(invalid="ignore", divide="ignore"):
        return 2 * overlap / (tumor + predicted), overlap / union


def segmentation_metrics(
    pixel_counts: np.ndarray,
    groups: np.ndarray,
    group_names: Sequence[str],
    pixels_per_patch: int,
) -> dict[str, Any]:
    """Dice and IoU of the tumor map, over all patches and per group.

    ``dice`` and ``iou`` pool the pixels of the patches (Dice on tumor pixels, false
    positives in non-tumor patches included); ``mean_patch_dice`` averages the Dice of
    the patches that hold tumor pixels, so small tumors count as much as large ones.
    Both are ``None`` where the patches hold no tumor pixel (non-tumor groups): there,
    ``predicted_share`` (the share of pixels predicted tumor) is what to read.
    """
    counts = np.asarray(pixel_counts, dtype=np.int64)
    groups = np.asarray(groups)
    patch_dice, _ = patch_dice_iou(counts)

    def pooled(rows: np.ndarray) -> dict[str, Any]:
        tumor, predicted, overlap = counts[rows].sum(axis=0)
        pixels = int(rows.sum()) * pixels_per_patch
        with_tumor = rows & (counts[:, 0] > 0)
        return {
            "n": int(rows.sum()),
            "dice": _scalar(2 * overlap / (tumor + predicted)) if tumor else None,
            "iou": _scalar(overlap / (tumor + predicted - overlap)) if tumor else None,
            "mean_patch_dice": float(patch_dice[with_tumor].mean()) if with_tumor.any() else None,
            "tumor_share": float(tumor / pixels) if pixels else None,
            "predicted_share": float(predicted / pixels) if pixels else None,
        }

    return {
        **pooled(np.ones(len(counts), dtype=bool)),
        "threshold": 0.5,
        "groups": {name: pooled(groups == g) for g, name in enumerate(group_names)},
    }


def _scalar(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def selection_value(metrics: Mapping[str, Any], criterion: str) -> float:
    """Model-selection score of validation ``metrics``; larger is better.

    ``loss`` (added by the caller) is negated. An undefined value never wins (-inf).
    """
    if criterion not in SELECTION_CRITERIA:
        raise UnshortcutError(
            f"--select: unknown criterion {criterion!r} (known: {', '.join(SELECTION_CRITERIA)})"
        )
    value = metrics[criterion]
    if value is None or not math.isfinite(value):
        return -math.inf
    return -float(value) if criterion == "loss" else float(value)
