"""Metrics against scikit-learn and hand-computed cases; the image-level bootstrap."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from unshortcut.errors import UnshortcutError
from unshortcut.metrics import (
    SELECTION_CRITERIA,
    evaluate_predictions,
    robust_bins_per_class,
    selection_value,
)

NAMES = ["non-tumor|a<0.5", "non-tumor|a>=0.5", "tumor|a<0.5", "tumor|a>=0.5"]


def _evaluate(labels, scores, attributes, image_ids=None, **kw: Any) -> dict[str, Any]:
    labels = np.asarray(labels)
    kw.setdefault("robust_bins_by_class", [[1], [0]])
    kw.setdefault("n_bootstrap", 200)
    return evaluate_predictions(
        labels=labels,
        scores=np.asarray(scores, dtype=float),
        attributes=np.asarray(attributes),
        image_ids=np.arange(len(labels)) if image_ids is None else np.asarray(image_ids),
        group_names=NAMES,
        n_attributes=2,
        **kw,
    )


def _random(n: int = 3000, n_images: int = 60, seed: int = 0):
    """A shortcut: tumor patches mostly in bin 1, scores lean on the bin and on the image
    (stain, scanner: patches of one image err together); scores have ties."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    attributes = (rng.random(n) < np.where(labels == 1, 0.8, 0.3)).astype(int)
    image = rng.integers(0, n_images, n)
    image_shift = rng.normal(0, 0.15, n_images)[image]
    scores = 0.25 * labels + 0.3 * attributes + image_shift + rng.normal(0.25, 0.2, n)
    image_ids = np.array([f"img{i:03d}" for i in image])
    return labels, np.clip(scores, 0, 1).round(2), attributes, image_ids


# --- point estimates ---------------------------------------------------------------------


def test_matches_scikit_learn_on_random_data() -> None:
    labels, scores, attributes, image_ids = _random()
    m = _evaluate(labels, scores, attributes, image_ids)
    predictions = scores >= 0.5
    assert m["n"] == 3000
    assert m["n_images"] == 60
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, predictions), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(labels, predictions), abs=1e-12
    )
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    groups = labels * 2 + attributes
    group_acc = [accuracy_score(labels[groups == g], predictions[groups == g]) for g in range(4)]
    assert m["worst_group_accuracy"] == pytest.approx(min(group_acc), abs=1e-12)
    assert m["group_balanced_accuracy"] == pytest.approx(np.mean(group_acc), abs=1e-12)
    recalls = [np.mean(predictions[labels == c] == c) for c in (0, 1)]
    assert m["worst_class_accuracy"] == pytest.approx(min(recalls), abs=1e-12)
    for g, name in enumerate(NAMES):
        assert m["groups"][name]["accuracy"] == pytest.approx(group_acc[g], abs=1e-12)
        assert m["groups"][name]["n"] == int((groups == g).sum())
        assert m["groups"][name]["n_images"] == len(set(image_ids[groups == g]))
    # Robust AUROC: tumor patches in bin 0 (rare for tumor) vs non-tumor patches in bin 1.
    robust = ((labels == 1) & (attributes == 0)) | ((labels == 0) & (attributes == 1))
    assert m["robust_auroc"] == pytest.approx(
        roc_auc_score(labels[robust], scores[robust]), abs=1e-12
    )
    pair_auroc = {
        (p, q): roc_auc_score(
            labels[(groups == p) | (groups == q)], scores[(groups == p) | (groups == q)]
        )
        for p in (2, 3)
        for q in (0, 1)
    }
    worst_pair = min(pair_auroc, key=pair_auroc.__getitem__)
    assert m["worst_group_auroc"] == pytest.approx(pair_auroc[worst_pair], abs=1e-12)
    assert m["worst_group_auroc_groups"] == [NAMES[worst_pair[0]], NAMES[worst_pair[1]]]
    assert worst_pair == (2, 1)  # the shortcut's wrong-way pair


def test_ece_matches_the_reliability_curve_of_scikit_learn() -> None:
    labels, scores, attributes, _ = _random(seed=3)
    scores = np.clip(scores + 0.003, 0, 1)  # keep scores off the bin edges (float rounding)
    m = _evaluate(labels, scores, attributes, n_bootstrap=0)
    prob_true, prob_pred = calibration_curve(labels, scores, n_bins=15, strategy="uniform")
    bins = np.searchsorted(np.linspace(0, 1, 16)[1:-1], scores)
    counts = np.bincount(bins, minlength=15)
    expected = np.sum(counts[counts > 0] / len(scores) * np.abs(prob_true - prob_pred))
    assert m["ece"] == pytest.approx(expected, abs=1e-12)


def test_hand_computed_groups() -> None:
    """Four groups with known counts; every number below is worked out by hand.

    non-tumor|a<0.5: 20 rows, 18 right (0.9)   non-tumor|a>=0.5: 4 rows, 2 right (0.5)
    tumor|a<0.5:      5 rows,  3 right (0.6)   tumor|a>=0.5:    10 rows, 9 right (0.9)
    """
    spec = [(0, 0, 20, 18), (0, 1, 4, 2), (1, 0, 5, 3), (1, 1, 10, 9)]
    labels, attributes, scores = [], [], []
    for label, attribute, n, right in spec:
        labels += [label] * n
        attributes += [attribute] * n
        good, bad = (0.8, 0.3) if label == 1 else (0.2, 0.7)
        scores += [good] * right + [bad] * (n - right)
    m = _evaluate(labels, scores, attributes)
    assert m["worst_group_accuracy"] == pytest.approx(0.5)
    assert m["group_balanced_accuracy"] == pytest.approx((0.9 + 0.5 + 0.6 + 0.9) / 4)  # 0.725
    assert m["group_balanced_accuracy"] == pytest.approx(0.725)
    assert m["accuracy"] == pytest.approx(32 / 39)
    assert m["balanced_accuracy"] == pytest.approx((20 / 24 + 12 / 15) / 2)  # 0.81667
    assert m["worst_class_accuracy"] == pytest.approx(0.8)
    assert m["groups"]["non-tumor|a>=0.5"] == {
        "n": 4,
        "n_images": 4,
        "accuracy": pytest.approx(0.5),
        "ece": pytest.approx(abs(0 - (2 * 0.2 + 2 * 0.7)) / 4),  # 0.45
    }
    assert "group tumor|a<0.5 has 5 samples (< 30): its accuracy is unreliable" in m["warnings"]
    assert (
        "group non-tumor|a<0.5 has 20 samples (< 30): its accuracy is unreliable" in (m["warnings"])
    )


def test_hand_computed_robust_auroc() -> None:
    # Robust bins from the training split: tumor is rare in bin 0, non-tumor in bin 1.
    train_labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    train_attributes = np.array([0, 1, 1, 1, 0, 0, 0, 1, 1])
    assert robust_bins_per_class(train_labels, train_attributes, 2, 2) == [[1], [0]]
    labels = [1, 1, 0, 0, 0, 1, 0]
    attributes = [0, 0, 1, 1, 1, 1, 0]  # the last two rows are not in the robust subset
    scores = [0.2, 0.6, 0.1, 0.6, 0.7, 0.99, 0.0]
    m = _evaluate(labels, scores, attributes, robust_bins_by_class=[[1], [0]])
    # Positives 0.2, 0.6 vs negatives 0.1, 0.6, 0.7: 0.2 beats 0.1 (1); 0.6 beats 0.1 (1)
    # and ties 0.6 (1/2): 2.5 of 6 pairs.
    assert m["robust_auroc"] == pytest.approx(2.5 / 6)
    # Pairs: tumor|a<0.5 vs non-tumor|a>=0.5 is the robust subset (2.5/6); vs non-tumor|a<0.5
    # (score 0.0) it is 1; tumor|a>=0.5 (0.99) beats every negative: 1.
    assert m["worst_group_auroc"] == pytest.approx(2.5 / 6)
    assert m["worst_group_auroc_groups"] == ["tumor|a<0.5", "non-tumor|a>=0.5"]


def test_hand_computed_ece() -> None:
    labels = [0, 1, 1, 1, 0]
    scores = [0.1, 0.1, 0.9, 0.9, 0.55]
    # Bins (width 1/15): {0.1, 0.1}: |1 - 0.2| = 0.8; {0.9, 0.9}: |2 - 1.8| = 0.2;
    # {0.55}: |0 - 0.55| = 0.55. ECE = (0.8 + 0.2 + 0.55) / 5 = 0.31.
    m = _evaluate(labels, scores, [0, 0, 1, 1, 1], n_bootstrap=0)
    assert m["ece"] == pytest.approx(0.31)
    # Per group: tumor|a>=0.5 holds the two 0.9 scores with label 1: |2 - 1.8| / 2 = 0.1.
    assert m["groups"]["tumor|a>=0.5"]["ece"] == pytest.approx(0.1)


def test_empty_group_absent_class_and_json() -> None:
    labels = [0] * 40 + [1] * 40
    attributes = [0] * 20 + [1] * 20 + [1] * 40  # no tumor patch with a < 0.5
    scores = [0.1] * 30 + [0.9] * 10 + [0.8] * 40
    m = _evaluate(labels, scores, attributes, image_ids=np.arange(80) // 4)
    assert m["groups"]["tumor|a<0.5"] == {"n": 0, "n_images": 0, "accuracy": None, "ece": None}
    assert m["worst_group_accuracy"] == pytest.approx(0.5)  # non-tumor|a>=0.5: 10 of 20
    assert m["group_balanced_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["robust_auroc"] is None
    assert m["robust_auroc_ci"] is None
    assert (
        "group tumor|a<0.5 has no samples: it is left out of worst-group and group-balanced "
        "accuracy" in m["warnings"]
    )
    assert any(w.startswith("robust_auroc is undefined") for w in m["warnings"])
    _assert_plain_json(m)

    only_negatives = _evaluate([0] * 40, [0.2] * 40, [0, 1] * 20)
    assert only_negatives["auroc"] is None
    assert only_negatives["auroc_ci"] is None
    assert only_negatives["balanced_accuracy"] == 1.0
    assert any("class tumor is absent" in w for w in only_negatives["warnings"])


def _assert_plain_json(value: Any) -> None:
    """Only dict, list, str, int, float (finite), bool and None: no numpy scalars."""
    assert json.loads(json.dumps(value, allow_nan=False)) == value
    if isinstance(value, dict):
        for item in value.values():
            _assert_plain_json(item)
    elif isinstance(value, list):
        for item in value:
            _assert_plain_json(item)
    else:
        assert value is None or type(value) in (str, int, float, bool)


def test_robust_bins_follow_shares_not_sizes() -> None:
    """The shortcut bins are where a class's share is lowest, not where it has fewest rows."""
    # Bin 0: 30 tumor, 270 non-tumor (tumor share 0.1); bin 1: 10 tumor, 5 non-tumor (0.67).
    # Tumor has its fewest rows in bin 1, but the shortcut points away from tumor in bin 0.
    labels = np.array([1] * 30 + [0] * 270 + [1] * 10 + [0] * 5)
    attributes = np.array([0] * 300 + [1] * 15)
    assert robust_bins_per_class(labels, attributes, 2, 2) == [[1], [0]]
    # Robust AUROC scores tumor patches of bin 0 against non-tumor patches of bin 1.
    scores = np.where(attributes == 1, 0.9, 0.1)
    scores[:30] = 0.6  # tumor in bin 0 scores below every non-tumor patch of bin 1
    m = _evaluate(labels, scores, attributes, robust_bins_by_class=[[1], [0]], n_bootstrap=0)
    assert m["robust_auroc"] == pytest.approx(0.0)  # 0.6 < 0.9 for every pair
    rarest_by_size = _evaluate(
        labels, scores, attributes, robust_bins_by_class=[[1], [1]], n_bootstrap=0
    )
    assert rarest_by_size["robust_auroc"] == pytest.approx(0.5)  # bin-1 tumor ties at 0.9


def test_robust_bins_with_several_bins_ties_and_empty_bins() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    attributes = np.array([0, 0, 2, 2, 0, 0, 3, 3, 2, 2])
    # Shares of class 0: bin 0 2/4, bin 2 2/4, bin 3 0/2 (bin 1 holds no rows: ignored).
    # Shares of class 1: bin 0 2/4, bin 2 2/4, bin 3 2/2: bins 0 and 2 tie.
    assert robust_bins_per_class(labels, attributes, 2, 4) == [[3], [0, 2]]
    with pytest.raises(ValueError, match="no rows of class 1"):
        robust_bins_per_class(np.zeros(3, int), np.array([0, 1, 2]), 2, 3)


# --- bootstrap ---------------------------------------------------------------------------


CI_NAMES = (
    "worst_group_accuracy",
    "balanced_accuracy",
    "group_balanced_accuracy",
    "accuracy",
    "auroc",
    "robust_auroc",
)


def test_bootstrap_intervals_contain_the_estimate_and_follow_the_seed() -> None:
    data = _random()
    m = _evaluate(*data, seed=1)
    for name in CI_NAMES:
        lo, hi = m[f"{name}_ci"]
        assert lo <= m[name] <= hi, name
        assert hi - lo > 0, name
    assert _evaluate(*data, seed=1) == m
    other = _evaluate(*data, seed=2)
    assert other["accuracy"] == m["accuracy"]
    assert other["accuracy_ci"] != m["accuracy_ci"]
    assert m["bootstrap"] == {"replicates": 200, "unit": "image", "confidence": 0.95, "seed": 1}


def test_bootstrap_equals_a_loop_over_resampled_images() -> None:
    """The vectorised replicates equal scikit-learn on explicitly resampled images."""
    labels, scores, attributes, image_ids = _random(n=600, n_images=25, seed=5)
    n_bootstrap = 40
    m = _evaluate(labels, scores, attributes, image_ids, n_bootstrap=n_bootstrap, seed=7)
    images, index = np.unique(image_ids, return_inverse=True)
    draws = np.random.default_rng(7).integers(0, len(images), size=(n_bootstrap, len(images)))
    replicates: dict[str, list[float]] = {name: [] for name in CI_NAMES}
    for drawn in draws:
        rows = np.concatenate([np.flatnonzero(index == i) for i in drawn])
        y, s, a = labels[rows], scores[rows], attributes[rows]
        g = y * 2 + a
        group_acc = [accuracy_score(y[g == k], s[g == k] >= 0.5) for k in np.unique(g)]
        robust = ((y == 1) & (a == 0)) | ((y == 0) & (a == 1))
        replicates["accuracy"].append(accuracy_score(y, s >= 0.5))
        replicates["balanced_accuracy"].append(balanced_accuracy_score(y, s >= 0.5))
        replicates["worst_group_accuracy"].append(min(group_acc))
        replicates["group_balanced_accuracy"].append(np.mean(group_acc))
        replicates["auroc"].append(roc_auc_score(y, s))
        replicates["robust_auroc"].append(roc_auc_score(y[robust], s[robust]))
    for name, values in replicates.items():
        expected = np.percentile(values, [2.5, 97.5])
        assert m[f"{name}_ci"] == pytest.approx(expected, abs=1e-12), name


def test_bootstrap_narrows_with_more_images() -> None:
    few = _evaluate(*_random(n=4000, n_images=20, seed=4))
    many = _evaluate(*_random(n=4000, n_images=400, seed=4))
    for name in ("accuracy", "balanced_accuracy", "auroc"):
        width_few = few[f"{name}_ci"][1] - few[f"{name}_ci"][0]
        width_many = many[f"{name}_ci"][1] - many[f"{name}_ci"][0]
        assert width_many < width_few, name


def test_cluster_bootstrap_resamples_whole_images() -> None:
    """50 patches per image, all right or all wrong: only 20 independent samples exist."""
    n_images, per_image = 20, 50
    image_ids = np.repeat(np.arange(n_images), per_image)
    labels = np.repeat(np.arange(n_images) % 2, per_image)
    attributes = np.repeat((np.arange(n_images) // 2) % 2, per_image)
    image_right = np.arange(n_images) % 5 != 0  # 4 of 20 images wrong
    scores = np.where(np.repeat(image_right, per_image), labels * 0.8 + 0.1, 0.9 - labels * 0.8)
    clustered = _evaluate(labels, scores, attributes, image_ids=image_ids, n_bootstrap=1000)
    patchwise = _evaluate(labels, scores, attributes, n_bootstrap=1000)  # one image per patch
    assert clustered["accuracy"] == patchwise["accuracy"] == pytest.approx(0.8)
    width_clustered = np.diff(clustered["accuracy_ci"])[0]
    width_patchwise = np.diff(patchwise["accuracy_ci"])[0]
    # Binomial sd: sqrt(0.16 / 20) = 0.089 per image vs sqrt(0.16 / 1000) = 0.013 per patch.
    assert width_clustered > 5 * width_patchwise
    assert width_clustered == pytest.approx(4 * math.sqrt(0.16 / 20), rel=0.25)
    # Resampled accuracies move in steps of one image (1/20).
    assert np.allclose(
        np.array(clustered["accuracy_ci"]) * 20, np.round(np.array(clustered["accuracy_ci"]) * 20)
    )


def test_bootstrap_warns_about_replicates_without_a_group() -> None:
    # One image carries the only tumor|a<0.5 patches: about 1/e of replicates miss it.
    labels = [1] * 5 + [0, 1] * 50
    attributes = [0] * 5 + [0, 1] * 50
    scores = [0.9] * 5 + [0.2, 0.8] * 50
    image_ids = [0] * 5 + list(np.arange(100) // 10 + 1)
    m = _evaluate(labels, scores, attributes, image_ids=image_ids, n_bootstrap=500)
    lacking = [w for w in m["warnings"] if w.startswith("bootstrap:")]
    assert len(lacking) == 1
    count = int(lacking[0].split()[1])
    assert lacking[0] == (
        f"bootstrap: {count} of 500 replicates lack group tumor|a<0.5 (worst-group and "
        "group-balanced accuracy are undefined there and left out of their intervals)"
    )
    assert 0.3 < count / 500 < 0.45  # (1 - 1/11) ** 11 = 0.35
    # The group's patches are all right, the other tumor patches too, non-tumor ones at
    # 0.2 too: every defined replicate has WGA 1.0; the undefined ones are not 0.0.
    assert m["worst_group_accuracy_ci"] == [1.0, 1.0]
    assert m["ci_notes"]["worst_group_accuracy"] == (
        f"interval from the {500 - count} of 500 replicates where worst_group_accuracy is "
        "defined (the others lack a group or class)"
    )
    assert "accuracy" not in m["ci_notes"]
    images = np.arange(40) % 3
    few = _evaluate(images == 1, [0.2] * 40, [0, 1] * 20, image_ids=images)
    assert any("only 3 image(s)" in w for w in few["warnings"])
    assert any("replicates lack class" in w for w in few["warnings"])


def test_no_interval_where_most_replicates_lack_a_group_or_one_image() -> None:
    # Each group lives in one image of four: a resample holds every group only when it
    # draws all four images, 4! / 4^4 = 9% of the time.
    labels = [1, 1, 0, 0]
    attributes = [0, 1, 0, 1]
    scores = [0.9, 0.9, 0.1, 0.1]
    m = _evaluate(labels, scores, attributes, image_ids=[0, 1, 2, 3], n_bootstrap=400)
    assert m["worst_group_accuracy"] == 1.0
    assert m["worst_group_accuracy_ci"] is None
    assert m["ci_notes"]["worst_group_accuracy"].endswith(
        "bootstrap replicates lack a group or class that worst_group_accuracy needs, so "
        "there is no interval"
    )
    one = _evaluate([0, 1, 0, 1], [0.2, 0.8, 0.3, 0.4], [0, 1, 1, 0], image_ids=[7] * 4)
    assert all(one[f"{name}_ci"] is None for name in CI_NAMES)
    reason = (
        "1 image in the split: an image-level bootstrap needs at least 2, so there is no interval"
    )
    assert one["ci_notes"] == dict.fromkeys(CI_NAMES, reason)
    assert reason in one["warnings"]


def test_no_bootstrap() -> None:
    m = _evaluate(*_random(n=200), n_bootstrap=0)
    assert all(m[f"{name}_ci"] is None for name in CI_NAMES)
    assert m["accuracy"] is not None


def test_input_errors() -> None:
    with pytest.raises(UnshortcutError, match=r"scores: 1 non-finite value\(s\)"):
        _evaluate([0, 1], [0.2, np.nan], [0, 1])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        _evaluate([0, 2], [0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match=r"attributes must lie in 0\.\.1"):
        _evaluate([0, 1], [0.2, 0.3], [0, 2])


# --- model selection ---------------------------------------------------------------------


def test_selection_value() -> None:
    metrics = {name: 0.5 for name in SELECTION_CRITERIA} | {"loss": 0.3, "accuracy": None}
    assert selection_value(metrics, "worst_group_accuracy") == 0.5
    assert selection_value(metrics, "loss") == -0.3
    assert selection_value(metrics, "accuracy") == -math.inf
    assert SELECTION_CRITERIA == (
        "worst_group_accuracy",
        "balanced_accuracy",
        "group_balanced_accuracy",
        "accuracy",
        "worst_class_accuracy",
        "loss",
    )
    with pytest.raises(UnshortcutError) as info:
        selection_value(metrics, "auroc")
    assert str(info.value) == (
        "--select: unknown criterion 'auroc' (known: worst_group_accuracy, balanced_accuracy, "
        "group_balanced_accuracy, accuracy, worst_class_accuracy, loss)"
    )
