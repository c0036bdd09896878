"""Several attributes: intersectional groups and names, per-attribute metrics, attribute
decodability, continuous attributes without a threshold, and methods trained on their own
attributes (GERNE, GroupDRO on intersections or on one attribute of several)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from test_data import write_toy_patch_set
from unshortcut.cli import app
from unshortcut.config import TrainConfig
from unshortcut.errors import UnshortcutError
from unshortcut.groups import fit_groups, parse_attribute_specs
from unshortcut.methods import get_method
from unshortcut.metrics import (
    attribute_bins,
    attribute_decodability,
    evaluate_predictions,
    per_attribute_metrics,
)
from unshortcut.rows import intersection_index
from unshortcut.tiling.patchset import PatchSet, write_patch_set
from unshortcut.train import LoopContext, train, training_data


def write_site_patch_set(path: Path) -> Path:
    """The toy patch set plus a site column (A/B) that follows the label 70% of the time."""
    plain = PatchSet.open(write_toy_patch_set(path.with_name(f"{path.name}-plain"), n=240))
    table = plain.table.copy()
    follows = np.random.default_rng(0).random(len(table)) < 0.7
    table["site"] = np.where(follows == (table["label"] == 1), "A", "B")
    write_patch_set(path, table, np.asarray(plain.pixels), np.asarray(plain.masks), {})
    return path


@pytest.fixture(scope="module")
def site_patches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_site_patch_set(tmp_path_factory.mktemp("sites") / "patches")


FAST = {"epochs": 2, "batch_size": 32, "bootstrap": 0, "device": "cpu", "num_threads": 1}
BOTH = ["tissue_ratio", "site"]


# ----------------------------------------------------------------------------- groups


def test_intersectional_group_names_read_well() -> None:
    table = pd.DataFrame(  # every label x tissue bin x site once
        {
            "label": [0, 0, 0, 0, 1, 1, 1, 1],
            "tissue_ratio": [0.1, 0.2, 0.8, 0.9, 0.1, 0.2, 0.8, 0.9],
            "site": ["A", "B", "A", "B", "A", "B", "A", "B"],
        }
    )
    scheme = fit_groups(table, parse_attribute_specs(BOTH, []))
    assert scheme.bin_counts == (2, 2)
    assert scheme.group_names[:4] == (
        "non-tumor|tissue_ratio<0.5&site=A",
        "non-tumor|tissue_ratio<0.5&site=B",
        "non-tumor|tissue_ratio>=0.5&site=A",
        "non-tumor|tissue_ratio>=0.5&site=B",
    )
    assert scheme.group_names[7] == "tumor|tissue_ratio>=0.5&site=B"


def test_a_number_outside_0_1_without_thresholds_is_split_at_its_training_median() -> None:
    table = pd.DataFrame(
        {
            "label": [0, 1] * 4,
            "age": [30, 40, 50, 60, 70, 80, 90, 100],
            "share": [0.1, 0.1, 0.9, 0.9] * 2,
        }
    )
    scheme = fit_groups(table, parse_attribute_specs(["age", "share"], []))
    assert scheme.attributes[0].edges == (65.0,)  # the median: no hand-picked tau
    assert scheme.attributes[1].edges == (0.5,)  # a share keeps the default threshold
    assert scheme.attribute_names[0] == "age<65&share<0.5"


# ----------------------------------------------------------------------------- metrics


def test_attribute_bins_invert_the_intersection_index() -> None:
    rng = np.random.default_rng(0)
    counts = (3, 2, 4)
    bins = np.stack([rng.integers(0, c, 50) for c in counts], axis=1)
    np.testing.assert_array_equal(attribute_bins(intersection_index(bins, counts), counts), bins)
    assert attribute_bins(np.zeros(3, np.int64), ()).shape == (3, 0)


def test_per_attribute_metrics_match_a_hand_count() -> None:
    rng = np.random.default_rng(1)
    n = 400
    labels = rng.integers(0, 2, n)
    bins = np.stack([rng.integers(0, 2, n), rng.integers(0, 3, n)], axis=1)
    scores = np.clip(0.5 * labels + 0.3 * (bins[:, 1] == 2) + 0.3 * rng.random(n), 0, 1)
    result = per_attribute_metrics(
        labels=labels,
        scores=scores,
        attributes=intersection_index(bins, (2, 3)),
        bin_counts=(2, 3),
        bin_names=[["t<0.5", "t>=0.5"], ["site=A", "site=B", "site=C"]],
        columns=["tissue_ratio", "site"],
    )
    correct = (scores >= 0.5) == (labels == 1)
    for j, column in enumerate(["tissue_ratio", "site"]):
        frame = pd.DataFrame({"label": labels, "bin": bins[:, j], "correct": correct})
        by_group = frame.groupby(["label", "bin"])["correct"].mean()
        assert result[column]["worst_group_accuracy"] == pytest.approx(by_group.min())
        assert result[column]["group_balanced_accuracy"] == pytest.approx(by_group.mean())
    assert result["site"]["groups"]["tumor|site=C"]["accuracy"] == pytest.approx(
        correct[(labels == 1) & (bins[:, 1] == 2)].mean()
    )
    assert len(result["site"]["groups"]) == 6


def test_empty_and_tiny_intersections_are_named() -> None:
    """Group (tumor, tissue high, site B) has no rows, (tumor, tissue low, site A) 3."""
    names = [
        f"{c}|{t}&{s}"
        for c in ("non-tumor", "tumor")
        for t in ("tissue_ratio<0.5", "tissue_ratio>=0.5")
        for s in ("site=A", "site=B")
    ]
    sizes = {0: 40, 1: 40, 2: 40, 3: 40, 4: 3, 5: 40, 6: 40, 7: 0}
    groups = np.concatenate([np.full(n, g) for g, n in sizes.items()])
    labels, attributes = groups // 4, groups % 4
    metrics = evaluate_predictions(
        labels=labels,
        scores=np.full(len(labels), 0.7),
        attributes=attributes,
        image_ids=np.arange(len(labels)) % 7,
        group_names=names,
        n_attributes=4,
        robust_bins_by_class=[[3], [0]],
        n_bootstrap=0,
    )
    assert (
        "group tumor|tissue_ratio>=0.5&site=B has no samples: it is left out of worst-group "
        "and group-balanced accuracy"
    ) in metrics["warnings"]
    assert (
        "group tumor|tissue_ratio<0.5&site=A has 3 samples (< 30): its accuracy is unreliable"
        in metrics["warnings"]
    )
    assert metrics["groups"]["tumor|tissue_ratio>=0.5&site=B"] == {
        "n": 0, "n_images": 0, "accuracy": None, "ece": None,
    }  # fmt: skip


def test_decodability_of_categorical_continuous_and_label_only_features() -> None:
    rng = np.random.default_rng(0)

    def rows(n: int) -> dict[str, np.ndarray]:
        label = rng.integers(0, 2, n)
        site = np.where(rng.random(n) < 0.8, label, 1 - label)  # follows the label
        ratio = rng.random(n)
        noise = rng.standard_normal((n, 6))
        return {"label": label, "site": site, "ratio": ratio, "noise": noise}

    fit, scored = rows(600), rows(600)

    def probe(features: str, target: str, continuous: bool) -> dict[str, Any]:
        def stack(r: dict[str, np.ndarray]) -> np.ndarray:
            columns = {
                "site": r["site"][:, None] + 0.3 * r["noise"][:, :1],
                "ratio": r["ratio"][:, None] + 0.05 * r["noise"][:, :1],
                "label": r["label"][:, None] + 0.3 * r["noise"][:, :1],
                "noise": r["noise"],
            }[features]
            return np.hstack([columns, r["noise"][:, 1:]])

        return attribute_decodability(
            fit_features=stack(fit),
            fit_target=fit[target],
            score_features=stack(scored),
            score_target=scored[target],
            score_labels=scored["label"],
            continuous=continuous,
        )

    encoded = probe("site", "site", continuous=False)
    assert encoded["auroc"] > 0.95 and encoded["auroc_within_class"] > 0.95
    assert encoded["target"] == "categories" and "r2" not in encoded
    assert abs(probe("noise", "site", continuous=False)["auroc"] - 0.5) < 0.08
    ratio = probe("ratio", "ratio", continuous=True)
    assert ratio["r2"] > 0.9 and ratio["auroc"] > 0.95
    assert ratio["target"].startswith("above the fitting split's median")
    # Features that hold the label alone decode a label-correlated site overall, but not
    # within a class: the within-class AUROC separates the two.
    label_only = probe("label", "site", continuous=False)
    assert label_only["auroc"] > 0.7
    assert abs(label_only["auroc_within_class"] - 0.5) < 0.08
    one_value = attribute_decodability(
        fit_features=fit["noise"],
        fit_target=np.zeros(600),
        score_features=scored["noise"],
        score_target=scored["site"],
        score_labels=scored["label"],
        continuous=False,
    )
    assert one_value["auroc"] is None and "one value" in one_value["note"]


# ----------------------------------------------------------------------------- training


def test_a_run_with_two_attributes_reports_per_attribute_metrics_and_decodability(
    site_patches: Path, tmp_path: Path
) -> None:
    run = train(TrainConfig(patches=site_patches, out=tmp_path / "erm", attributes=BOTH, **FAST),
                progress=False)  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["group_names"]) == 8
    test = metrics["test"]
    assert set(test["per_attribute"]) == {"tissue_ratio", "site"}
    predictions = pd.read_parquet(run / "predictions" / "test.parquet")
    site = predictions["attribute"].str.extract(r"site=(\w+)")[0]
    correct = predictions["prediction"] == predictions["label"]
    by_site = correct.groupby([predictions["label"], site]).mean()
    assert test["per_attribute"]["site"]["worst_group_accuracy"] == pytest.approx(by_site.min())
    # Decodability: every attribute, for the primary checkpoint and every criterion.
    assert set(metrics["decodability"]) == {"tissue_ratio", "site"}
    assert 0.0 <= metrics["decodability"]["site"]["auroc"] <= 1.0
    assert metrics["decodability"]["tissue_ratio"]["r2"] is not None
    for entry in metrics["by_criterion"].values():
        assert set(entry["decodability"]) == {"tissue_ratio", "site"}


def test_method_attributes_train_on_their_own_groups_while_metrics_use_all(
    site_patches: Path, tmp_path: Path
) -> None:
    def context(method_attributes: list[str]) -> LoopContext:
        config = TrainConfig(patches=site_patches, out=tmp_path / "x", attributes=BOTH,
                             taus=[0.5], method_attributes=method_attributes, **FAST)  # fmt: skip
        device = torch.device("cpu")
        return LoopContext(config, training_data(config, device), device)

    intersection = context([])
    assert intersection.train.bin_counts == (2, 2) and intersection.train.n_groups == 8
    site_only = context(["site"])
    assert site_only.train.bin_counts == (2,) and site_only.train.attribute_names == ("site",)
    np.testing.assert_array_equal(site_only.train.labels, intersection.train.labels)
    np.testing.assert_array_equal(site_only.train.bins[:, 0], intersection.train.bins[:, 1])
    np.testing.assert_array_equal(site_only.val.bins[:, 0], intersection.val.bins[:, 1])
    quartiles = context(["tissue_ratio:q4"])  # the run's --tau does not concern it
    assert quartiles.train.bin_counts == (4,)
    # GroupDRO keeps one weight per group of the method's groups; GERNE balances its bins.
    assert len(get_method("groupdro")(intersection).q) == 8
    assert len(get_method("groupdro")(site_only).q) == 4
    gerne = get_method("gerne")(quartiles)
    rows = next(gerne.epoch_batches(0, np.random.default_rng(0)))
    assert len(rows) == 2 * gerne.per_class * 2
    assert set(quartiles.train.bins[rows, 0]) <= {0, 1, 2, 3}
    with pytest.raises(UnshortcutError, match="no column 'scanner'"):
        context(["scanner"])


@pytest.mark.parametrize(
    ("method", "method_attributes"),
    [("gerne", []), ("groupdro", []), ("gerne", ["site"]), ("gerne", ["tissue_ratio:q4"])],
)
def test_gerne_and_groupdro_train_on_intersections_and_on_one_attribute(
    method: str, method_attributes: list[str], site_patches: Path, tmp_path: Path
) -> None:
    config = TrainConfig(patches=site_patches, out=tmp_path / "run", method=method,
                         attributes=BOTH, method_attributes=method_attributes, **FAST)  # fmt: skip
    run = train(config, progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["group_names"]) == 8  # scored on the intersections either way
    assert metrics["test"]["worst_group_accuracy"] is not None
    saved = json.loads((run / "config.json").read_text())
    assert saved["method_attributes"] == method_attributes


def test_cli_method_attribute_flag(site_patches: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", str(site_patches), "--out", str(out), "--method", "gerne", "--epochs", "1",
            "--attribute", "tissue_ratio", "--attribute", "site", "--method-attribute", "site",
            "--batch-size", "32", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["method_attributes"] == ["site"]
    unknown = [*args[:-4], "stain", *args[-3:], "--overwrite"]  # --method-attribute stain
    bad = CliRunner().invoke(app, unknown)
    assert bad.exit_code == 2 and "no column 'stain'" in bad.output
