"""bench/multi_attribute.py: variants, floors, and a tiny experiment end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from test_multi_attribute import write_site_patch_set

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # the script imports its sibling robustness.py
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_multi_attribute", BENCH / "multi_attribute.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


bench = _load()


def _stat(mean: float) -> dict:
    return {"mean": mean, "std": 0.0, "values": [mean]}


def _row(method: str, wga: float, tissue: float, site: float) -> dict:
    return {
        "method": method,
        "worst_group_accuracy": _stat(wga),
        "decodability": {"tissue_ratio": {"auroc": _stat(tissue)}, "site": {"auroc": _stat(site)}},
    }


def test_variants_and_folders() -> None:
    assert bench.VARIANT_NAMES == (
        "erm", "gerne:tissue_ratio", "gerne:tissue_ratio:q4", "gerne:site",
        "gerne:intersection", "groupdro:intersection", "mimm", "mimm:gaussian",
        "mimm:gaussian:x2", "mimm:gaussian:x5",
    )  # fmt: skip
    folders = {v.label: v.folder for v in bench.VARIANTS}
    assert folders["gerne:tissue_ratio:q4"] == "tissue_ratio-q4"
    assert folders["erm"] == "" and folders["mimm"] == ""
    assert folders["mimm:gaussian"] == "gaussian" and folders["mimm:gaussian:x5"] == "gaussian-x5"
    assert bench.MIMMS == ("mimm", "mimm:gaussian", "mimm:gaussian:x2", "mimm:gaussian:x5")
    assert len({(v.method, v.folder) for v in bench.VARIANTS}) == len(bench.VARIANTS)
    # A folder name stands for one set of method attributes, whatever the method.
    attributes = {v.folder: v.method_attributes for v in bench.VARIANTS}
    assert all(v.method_attributes == attributes[v.folder] for v in bench.VARIANTS)


def test_floors() -> None:
    rows = [
        _row("erm", 0.40, 0.90, 0.80),
        _row("gerne:site", 0.43, 0.90, 0.70),
        _row("gerne:intersection", 0.47, 0.85, 0.70),
        _row("mimm", 0.46, 0.70, 0.55),
    ]
    floors = bench.floors(rows)
    assert floors["best_gerne"] == "gerne:intersection"
    assert floors["best_gerne_wga_gain_points"] == pytest.approx(7.0)
    assert floors["mimm_wga_gain_points"] == pytest.approx(6.0)
    assert floors["mimm_closer_to_chance"] == {"tissue_ratio": True, "site": True}
    assert floors["met"]
    # Another mimm variant is reported beside it; the verdict stays the default's.
    floors = bench.floors([*rows, _row("mimm:gaussian", 0.41, 0.95, 0.60)])
    assert floors["mimm:gaussian_wga_gain_points"] == pytest.approx(1.0)
    assert floors["mimm:gaussian_closer_to_chance"] == {"tissue_ratio": False, "site": True}
    assert floors["met"]
    rows[-1] = _row("mimm", 0.46, 0.70, 0.15)  # |0.15 - 0.5| > |0.8 - 0.5|
    assert not bench.floors(rows)["met"]
    assert bench.floors(rows[1:]) is None


@pytest.mark.slow
def test_a_tiny_experiment_scores_every_variant_on_the_intersections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    patches = write_site_patch_set(tmp_path / "patches")
    settings = bench.Settings(trials=1, seeds=1, epochs=1, batch_size=32, bootstrap=0, threads=1)
    labels = ("erm", "gerne:site", "mimm", "mimm:gaussian")
    variants = tuple(v for v in bench.VARIANTS if v.label in labels)
    lines: list[str] = []
    # Calibration: ERM alone, validation only, on each candidate until the rule holds.
    monkeypatch.setattr(bench, "build_patches", lambda correlation, shift: patches)

    def runner_for(p: Path) -> object:
        return bench.VariantRunner(p, tmp_path / "work", settings, expected=1, log=lines.append)

    chosen, table = bench.calibrate(runner_for, settings, lines.append)
    assert chosen == patches and 1 <= len(table) <= len(bench.SITE_SHIFTS)
    assert [r["site_shift"] for r in table] == list(bench.SITE_SHIFTS[: len(table)])
    assert all(not r["both_shortcuts"] for r in table[:-1])
    gap = table[0]["balanced_accuracy"] - max(table[0]["tissue_ratio_wga"], table[0]["site_wga"])
    assert table[0]["both_shortcuts"] == (gap >= bench.SHORTCUT_GAP)
    result = bench.run_experiment(patches, tmp_path / "work", settings, variants, lines.append)
    assert result["runs_reused"] == 1  # the calibration's ERM run is the experiment's
    result["synth"] = {
        "site_label_correlation": 0.8, "site_shift": 0.15, "calibration": table,
        "shortcut_gap": bench.SHORTCUT_GAP,
    }  # fmt: skip
    assert [r["method"] for r in result["rows"]] == list(labels)
    gaussian = tmp_path / "work" / "tau0.5" / "mimm@gaussian" / "trial0-seed0"
    assert json.loads((gaussian / "config.json").read_text())["hp"]["estimator"] == "gaussian"
    assert result["rows"][3]["hparams"]["estimator"] == "gaussian"
    gerne = tmp_path / "work" / "tau0.5" / "gerne@site" / "trial0-seed0"
    config = json.loads((gerne / "config.json").read_text())
    assert config["attributes"] == ["tissue_ratio", "site"]
    assert config["method_attributes"] == ["site"]
    metrics = json.loads((gerne / "metrics.json").read_text())
    test = metrics["by_criterion"]["worst_group_accuracy"]["test"]
    row = result["rows"][1]
    assert row["worst_group_accuracy"]["mean"] == test["worst_group_accuracy"]
    assert (
        row["per_attribute"]["site"]["worst_group_accuracy"]["mean"]
        == (test["per_attribute"]["site"]["worst_group_accuracy"])
    )
    decode = metrics["by_criterion"]["worst_group_accuracy"]["decodability"]
    assert row["decodability"]["site"]["auroc"]["mean"] == decode["site"]["auroc"]
    assert "r2" in row["decodability"]["tissue_ratio"] and "r2" not in row["decodability"]["site"]
    assert result["floors"]["best_gerne"] == "gerne:site"
    section = bench.markdown(result, {"command": "c", "date": "d", "machine": "m", "wall": "w"})
    assert section.startswith("## Several attributes (synth)\n")
    assert section.count("| mimm |") == 2  # the accuracy and the decodability table
    assert bench.card_section(result).count("| synth | 0.5 |") == 4
