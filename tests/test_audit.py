"""Shortcut audit: numbers on constructed cases with known answers, verdict wording, console."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from sklearn.metrics import mutual_info_score, roc_auc_score
from typer.testing import CliRunner

from unshortcut.audit import audit_patch_set
from unshortcut.audit.thresholds import MIN_GROUP_PATCHES
from unshortcut.audit.verdict import METADATA_METHODS, TISSUE_METHODS
from unshortcut.cli import app
from unshortcut.errors import UnshortcutError
from unshortcut.groups import parse_attribute_specs
from unshortcut.methods import method_names
from unshortcut.metrics import image_bootstrap_auroc
from unshortcut.report.audit_section import write_audit
from unshortcut.report.console import audit_renderables
from unshortcut.tiling.patchset import PatchSet, write_patch_set

PLANNED_METHODS = {"spatial-mask"}
"""Methods the verdict may recommend before they are registered (spatial-mask is coming)."""
LOW, HIGH = 0.2, 0.8


def write_table_patch_set(path: Path, table: pd.DataFrame) -> PatchSet:
    """A patch set holding ``table`` (patch_id, image_id, split, label, tissue_ratio, ...)."""
    n = len(table)
    full = pd.DataFrame(
        {
            "patch_id": [f"p{i:05d}" for i in range(n)],
            "patient_id": table["image_id"],
            "x": np.arange(n) * 2,
            "y": np.zeros(n, np.int64),
            "size": np.full(n, 2),
            "level": np.zeros(n, np.int64),
            "tumor_fraction": table["label"].astype(float),
            "synthetic": np.ones(n, bool),
        }
    )
    for column in table.columns:
        full[column] = table[column].to_numpy()
    pixels = np.zeros((n, 1, 2, 2), np.uint8)
    masks = np.zeros((n, 2, 2), np.uint8)
    return write_patch_set(path, full, pixels, masks, {"generator": "tests.test_audit"})


def composed(
    images: int, per_image: dict[tuple[int, float], int], split: str = "train"
) -> pd.DataFrame:
    """``images`` images of identical composition: per_image[(label, tissue_ratio)] patches each."""
    rows = []
    for image in range(images):
        for (label, ratio), count in per_image.items():
            rows += [(f"{split}-img{image}", split, label, ratio)] * count
    return pd.DataFrame(rows, columns=["image_id", "split", "label", "tissue_ratio"])


def three_splits(per_image: dict[tuple[int, float], int], images: int = 10) -> pd.DataFrame:
    return pd.concat([composed(images, per_image, s) for s in ("train", "val", "test")])


# 3:1 tissue-rich among tumor, 1:3 among non-tumor: AUROC 0.75, minority share 25%.
SHORTCUT = {(1, HIGH): 3, (1, LOW): 1, (0, HIGH): 1, (0, LOW): 3}


@pytest.fixture(scope="module")
def shortcut_set(tmp_path_factory: pytest.TempPathFactory) -> PatchSet:
    return write_table_patch_set(tmp_path_factory.mktemp("audit") / "p", three_splits(SHORTCUT))


def test_known_answer_auroc_mutual_information_and_minority_groups(shortcut_set: PatchSet) -> None:
    result = audit_patch_set(shortcut_set, n_bootstrap=200)
    (audit,) = result.attributes
    value, ci = audit.auroc["train"]
    # P(score_tumor > score_non-tumor) + ties / 2 = 3/4 * 3/4 + (3/4 * 1/4 + 1/4 * 1/4... ) / 2
    assert value == pytest.approx(0.75)
    train = shortcut_set.table[shortcut_set.table["split"] == "train"]
    assert value == pytest.approx(roc_auc_score(train["label"], train["tissue_ratio"]))
    # Every image has the same composition, so every image resample gives the same AUROC.
    assert ci == pytest.approx([0.75, 0.75])
    # MI of a 2x2 table with p = (3/8, 1/8, 1/8, 3/8) and uniform margins, in bits.
    expected = 2 * 3 / 8 * math.log2(1.5) + 2 * 1 / 8 * math.log2(0.5)
    assert audit.mutual_information_bits == pytest.approx(expected)
    bins = (train["tissue_ratio"] >= 0.5).astype(int)
    assert expected == pytest.approx(mutual_info_score(train["label"], bins) / math.log(2))
    assert audit.label_entropy_bits == pytest.approx(1.0)
    assert audit.counts is not None
    assert audit.counts.minority_groups == ["non-tumor|tissue_ratio>=0.5", "tumor|tissue_ratio<0.5"]
    assert audit.counts.minority_share == pytest.approx(0.25)
    assert audit.counts.patches["val"].tolist() == [[30, 10], [10, 30]]
    assert audit.counts.images["train"].tolist() == [[10, 10], [10, 10]]


def test_image_bootstrap_matches_sklearn_and_resamples_images_not_patches() -> None:
    rng = np.random.default_rng(0)
    images = np.repeat(np.arange(12), 20)
    labels = (rng.random(len(images)) < 0.3 + 0.04 * images).astype(int)
    scores = rng.normal(labels * 0.8 + 0.05 * images, 1.0)
    value, ci = image_bootstrap_auroc(labels, scores, images, n_bootstrap=300, seed=1)
    assert value == pytest.approx(roc_auc_score(labels, scores))
    assert ci is not None and ci[0] < value < ci[1]
    # Copying every patch 5 times inside its image adds no information about new images:
    # an image-level bootstrap gives exactly the same interval (a patch bootstrap would shrink).
    same = image_bootstrap_auroc(
        np.repeat(labels, 5), np.repeat(scores, 5), np.repeat(images, 5), n_bootstrap=300, seed=1
    )
    assert same[0] == pytest.approx(value)
    assert same[1] == pytest.approx(ci)
    assert image_bootstrap_auroc(np.ones(5), np.arange(5.0), np.arange(5)) == (None, None)


def test_knn_mutual_information_on_continuous_attribute(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 2000
    ratio = rng.random(n)
    table = pd.DataFrame(
        {
            "image_id": [f"img{i % 40}" for i in range(n)],
            "split": np.where(np.arange(n) % 5 == 0, "val", "train"),
            "label": (ratio >= 0.5).astype(int),
            "tissue_ratio": ratio,
            "noise": rng.random(n),
        }
    )
    table.loc[table["label"] == 1, "noise"] = rng.random(int(table["label"].sum()))
    result = audit_patch_set(write_table_patch_set(tmp_path / "p", table), n_bootstrap=0)
    tissue, noise = result.attributes
    # The label is a function of tissue_ratio: MI = H(label) = 1 bit; noise is independent.
    assert tissue.mutual_information_knn_bits == pytest.approx(1.0, abs=0.1)
    assert noise.mutual_information_knn_bits == pytest.approx(0.0, abs=0.03)
    assert tissue.auroc["train"] == (1.0, None)


def test_tau_suggestions_put_the_class_boundary_first_and_skip_unmeasurable(
    tmp_path: Path,
) -> None:
    # tissue_ratio on a grid; label = ratio >= 0.6, except every 5th patch flipped: the
    # classes differ most at 0.6; near the ends a minority group runs out of patches.
    n_per_image, images = 100, 8
    ratio = np.tile((np.arange(n_per_image) + 0.5) / n_per_image, images * 2)  # 60% below 0.6
    label = (ratio >= 0.6).astype(int)
    label[::5] = 1 - label[::5]
    split = np.repeat(["train", "val"], n_per_image * images)
    image = [f"{s}-{i // n_per_image}" for i, s in enumerate(split)]
    table = pd.DataFrame({"image_id": image, "split": split, "label": label, "tissue_ratio": ratio})
    result = audit_patch_set(write_table_patch_set(tmp_path / "p", table), n_bootstrap=0)
    audit = result.attributes[0]
    assert audit.suggested_taus[0].tau == pytest.approx(0.6)
    by_tau = {t.tau: t for t in audit.taus}
    assert by_tau[0.6].gap == pytest.approx(max(t.gap for t in audit.taus))
    # At tau 0.95 the tissue-rich non-tumor group holds 1 patch per image: not measurable.
    assert by_tau[0.95].smallest["val"][1] < MIN_GROUP_PATCHES
    assert not by_tau[0.95].measurable
    assert all(t.measurable for t in audit.suggested_taus)


@pytest.mark.parametrize(
    ("per_image", "level", "start"),
    [
        (SHORTCUT, "strong", "strong tissue-size shortcut: tissue_ratio alone predicts the label "
         "with training AUROC 0.75 [0.75, 0.75] (higher values in tumor patches); the minority "
         "groups (non-tumor|tissue_ratio>=0.5, tumor|tissue_ratio<0.5) hold 25% of training "
         "patches; train with gerne or spatial-mask and select by validation worst-group "
         "accuracy"),
        ({(1, HIGH): 4, (1, LOW): 3, (0, HIGH): 3, (0, LOW): 4}, "weak",
         "weak tissue-size shortcut: tissue_ratio alone predicts the label with training AUROC "
         "0.57 [0.57, 0.57] (higher values in tumor patches); the minority groups "
         "(non-tumor|tissue_ratio>=0.5, tumor|tissue_ratio<0.5) hold 43% of training patches; "
         "erm is likely enough, but select it by validation worst-group accuracy"),
        ({(1, HIGH): 2, (1, LOW): 2, (0, HIGH): 2, (0, LOW): 2}, "none",
         "no tissue-size shortcut: tissue_ratio alone predicts the label with training AUROC "
         "0.50 [0.50, 0.50]; nothing to correct for tissue_ratio"),
    ],
)  # fmt: skip
def test_verdict_wording(tmp_path: Path, per_image: dict, level: str, start: str) -> None:
    patch_set = write_table_patch_set(tmp_path / "p", three_splits(per_image, images=12))
    result = audit_patch_set(patch_set, n_bootstrap=100, min_group_patches=10)
    assert result.verdict.level == level
    assert result.verdict.text.startswith(start)


def test_verdict_warns_when_a_minority_group_is_too_small_to_measure(
    shortcut_set: PatchSet,
) -> None:
    result = audit_patch_set(shortcut_set, n_bootstrap=0)  # 10 patches per minority group
    assert result.verdict.text.endswith(
        "Warning: the minority group non-tumor|tissue_ratio>=0.5 has 10 train patches from 10 "
        "image(s), too few to measure its accuracy (>= 30 patches from >= 3 images)"
    )


def test_constant_attribute_gets_its_own_verdict_not_an_error(tmp_path: Path) -> None:
    table = three_splits({(1, 1.0): 2, (0, 1.0): 2})
    table["site"] = np.where(table["image_id"].str.endswith(("0", "2", "4")), "A", "B")
    result = audit_patch_set(write_table_patch_set(tmp_path / "p", table), n_bootstrap=0)
    tissue = result.attributes[0]
    assert tissue.kind == "constant"
    assert tissue.verdict is not None
    assert tissue.verdict.text == (
        "no variation: tissue_ratio is 1.0 on every training patch, so no tissue-size shortcut "
        "can exist; audit another attribute (e.g. --attribute site)"
    )
    assert [a.column for a in result.attributes] == ["tissue_ratio", "site"]
    assert result.attributes[1].verdict.level == "none"  # site does not depend on the label
    assert any("train would refuse these groups" in w for w in result.warnings)


def test_inconclusive_when_the_interval_includes_chance(tmp_path: Path) -> None:
    # Two images carry the shortcut, one carries its opposite: 0.75 overall, but resampling
    # three images often draws the opposite one twice.
    aligned = {(1, HIGH): 6, (0, LOW): 6}
    opposite = {(1, LOW): 4, (0, HIGH): 4}
    train = pd.concat(
        [
            composed(1, aligned).assign(image_id="a"),
            composed(1, aligned).assign(image_id="b"),
            composed(1, opposite).assign(image_id="c"),
        ]
    )
    result = audit_patch_set(write_table_patch_set(tmp_path / "p", train), n_bootstrap=300)
    value, ci = result.attributes[0].auroc["train"]
    assert value == pytest.approx(0.75)
    assert ci[0] < 0.5
    assert result.verdict.level == "inconclusive"
    assert result.verdict.text.startswith("inconclusive tissue-size shortcut: ")


def test_recommended_methods_exist_or_are_planned() -> None:
    known = set(method_names()) | PLANNED_METHODS
    assert set(TISSUE_METHODS) | set(METADATA_METHODS) <= known


def test_metadata_columns_are_audited_categorical_with_their_own_advice(tmp_path: Path) -> None:
    table = three_splits(SHORTCUT)
    # Site A holds most tumor patches: a site shortcut besides the tissue one.
    position = np.arange(len(table))
    table["site"] = np.where((table["label"] == 1) == (position % 3 != 0), "A", "B")
    table["age"] = np.where(position % 7 == 0, np.nan, 60.0 + position % 30)  # gaps: skipped
    patch_set = write_table_patch_set(tmp_path / "p", table)
    result = audit_patch_set(patch_set, n_bootstrap=50)
    assert [a.column for a in result.attributes] == ["tissue_ratio", "site"]
    assert "column 'age' has 35 missing value(s): not audited" in result.warnings  # 240 / 7
    site = result.attributes[1]
    assert site.kind == "categorical"
    assert site.counts is not None and site.counts.bin_names == ("site=A", "site=B")
    assert site.verdict is not None
    assert "train with gerne or groupdro (--attribute site)" in site.verdict.text
    # Only tissue_ratio forms train's default groups; both attributes given: intersections.
    assert result.scheme is not None and len(result.scheme.attributes) == 1
    both = audit_patch_set(
        patch_set, parse_attribute_specs(["tissue_ratio", "site"], []), n_bootstrap=0
    )
    assert both.groups is not None and len(both.groups.bin_names) == 4


def _write_run(folder: Path, predictions: pd.DataFrame, val: dict) -> Path:
    (folder / "predictions").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"method": "erm", "seed": 0}))
    metrics = {"selection": {"criterion": "worst_group_accuracy", "epoch": 1}, "val": val}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    predictions.to_parquet(folder / "predictions" / "val.parquet", index=False)
    return folder


def test_run_errors_against_the_attribute_and_the_run_verdict(
    shortcut_set: PatchSet, tmp_path: Path
) -> None:
    table = shortcut_set.table
    val = table[table["split"] == "val"]
    # A model that says "tumor" exactly when there is much tissue.
    prediction = (val["tissue_ratio"] >= 0.5).astype(int)
    predictions = pd.DataFrame(
        {
            "patch_id": val["patch_id"],
            "image_id": val["image_id"],
            "label": val["label"],
            "group": "?",
            "score": prediction.astype(float),
            "prediction": prediction,
            "a_column_added_later": 1,
        }
    )
    metrics = {
        "worst_group_accuracy": 0.0,
        "balanced_accuracy": 0.75,
        "auroc": 0.75,
        "robust_auroc": 0.0,
    }
    run = _write_run(tmp_path / "run", predictions, metrics)
    result = audit_patch_set(shortcut_set, run=run, n_bootstrap=0)
    curve = result.attributes[0].errors["val"]
    low, high = np.searchsorted(curve.edges, [LOW, HIGH], side="right") - 1
    # Non-tumor: wrong exactly at high tissue (10 patches); tumor: wrong exactly at low tissue.
    assert curve.n[:, [low, high]].tolist() == [[30, 10], [10, 30]]
    assert curve.errors[:, [low, high]].tolist() == [[0, 10], [10, 0]]
    assert curve.rate[0, high] == 1.0 and curve.rate[1, high] == 0.0
    assert result.verdict.text.endswith(
        f"Run {run} (erm): validation worst-group accuracy 0.0% vs balanced accuracy 75.0%, "
        "robust AUROC 0.00 vs AUROC 0.75: it relies on the shortcut"
    )
    foreign = predictions.assign(patch_id="elsewhere")
    other = _write_run(tmp_path / "other", foreign, metrics)
    with pytest.raises(UnshortcutError, match="not in the audited patch set"):
        audit_patch_set(shortcut_set, run=other, n_bootstrap=0)


def test_console_tables_keep_every_group_name_whole_at_80_columns(tmp_path: Path) -> None:
    table = three_splits(SHORTCUT)
    sites = np.array(["hospital_north_scanner_a", "hospital_south_scanner_b", "clinic_c"])
    table["site"] = sites[(table["label"].to_numpy() + np.arange(len(table))) % 3]
    patch_set = write_table_patch_set(tmp_path / "p", table)
    result = audit_patch_set(
        patch_set, parse_attribute_specs(["tissue_ratio", "site"], []), n_bootstrap=20
    )
    console = Console(width=80, record=True, color_system=None)
    console.print(audit_renderables(result, console.width))
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in text
    for audit in result.attributes:
        assert audit.counts is not None
        for bin_name in audit.counts.bin_names:  # each row of the cross tables, whole
            assert any(bin_name in line.split() for line in lines), bin_name
        for group in audit.counts.minority_groups:
            assert any(line.strip() == group for line in lines), group
    # The intersections do not fit beside their counts: keys with a legend of whole names.
    intersections = result.groups
    assert intersections is not None
    for k, bin_name in enumerate(intersections.bin_names):
        assert f"  b{k + 1} = {bin_name}" in lines


def test_audit_folder_and_cli(shortcut_set: PatchSet, tmp_path: Path) -> None:
    out = tmp_path / "audit"
    runner = CliRunner()
    result = runner.invoke(
        app, ["audit", str(shortcut_set.path), "--out", str(out), "--bootstrap", "20"]
    )
    assert result.exit_code == 0, result.output
    assert "verdict: strong tissue-size shortcut" in " ".join(result.output.split())
    written = json.loads((out / "audit.json").read_text())
    assert written["verdict"]["level"] == "strong"
    assert written["attributes"][0]["auroc"]["train"]["value"] == pytest.approx(0.75)
    assert written["settings"]["mutual_information_unit"] == "bits"
    assert (out / "figures" / "distribution-tissue-ratio.png").stat().st_size > 1000
    html = (out / "audit.html").read_text()
    assert "data:image/png;base64," in html and "http" not in html.replace("http-equiv", "")
    assert "](figures/distribution-tissue-ratio.png)" in (out / "audit.md").read_text()
    groups = pd.read_csv(out / "groups.csv")
    assert set(groups["split"]) == {"train", "val", "test"}
    with pytest.raises(UnshortcutError, match="already exists"):
        write_audit(audit_patch_set(shortcut_set, n_bootstrap=0), out)
    bad = runner.invoke(app, ["audit", str(shortcut_set.path), "--attribute", "scanner"])
    assert bad.exit_code == 2
    assert "no column 'scanner'" in bad.output and "Traceback" not in bad.output
