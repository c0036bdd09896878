"""bench/spatial.py: rows, floors, the adding-up verdicts, the docs and the card section."""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from test_data import write_toy_patch_set
from unshortcut.tiling.patchset import PatchSet, write_patch_set

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # bench/spatial.py imports bench/robustness.py
    spec = importlib.util.spec_from_file_location("bench_spatial", BENCH / "spatial.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


spatial = _load()


def _stat(mean: float | None) -> dict:
    return {"mean": mean, "std": 0.0, "values": [mean]}


def _row(dataset: str, method: str, auroc: float, wga: float) -> dict:
    return {
        "dataset": dataset,
        "method": method,
        "robust_auroc": _stat(auroc),
        "worst_group_accuracy": _stat(wga),
    }


def test_floors_and_adding_up() -> None:
    rows = [
        _row("synth", "erm", 0.60, 0.40),
        _row("synth", "spatial-mask", 0.75, 0.47),
        _row("synth", "gerne", 0.70, 0.60),
        _row("synth", "spatial-mask+gerne", 0.80, 0.65),
        _row("synth", "reweight", 0.78, 0.70),
        _row("synth", "spatial-mask+reweight", 0.76, 0.72),
    ]
    assert spatial.floors(rows) == (
        "synth, spatial-mask - erm: robust AUROC +0.150 (floor +0.10, the seed paper +0.36), "
        "worst-group accuracy +7.0 points (floor +5): met"
    )
    assert spatial.floors(rows[:1]) is None
    lines = spatial.adding_up(rows)
    assert lines[0] == (
        "synth, spatial-mask+gerne: WGA +0.180 vs spatial-mask, +0.050 vs gerne (adds up); "
        "robust AUROC +0.050 vs spatial-mask, +0.100 vs gerne (adds up)"
    )
    assert "robust AUROC +0.010 vs spatial-mask, -0.020 vs reweight (does not add up)" in lines[1]


@pytest.mark.slow
def test_experiment_on_a_toy_set_writes_rows_aggregations_and_card_sections(
    tmp_path: Path,
) -> None:
    patches = write_toy_patch_set(tmp_path / "patches", n=160, size=16)
    settings = replace(
        spatial.Settings(), trials=1, seeds=1, epochs=1, batch_size=32, bootstrap=0, threads=1
    )
    entry = spatial.run_dataset("synth", patches, settings, tmp_path / "work", log=lambda _: None)
    rows = entry["rows"]
    assert [r["method"] for r in rows] == [*spatial.METHODS, *spatial.COMPONENTS]
    by_method = {r["method"]: r for r in rows}
    assert by_method["erm"]["dice"]["mean"] is None
    assert 0.0 <= by_method["spatial-mask"]["dice"]["mean"] <= 1.0
    assert {r["aggregation"] for r in entry["aggregation"]} == set(spatial.AGGREGATIONS)
    # The trial-0 run of spatial-mask is reused as the default aggregation's run.
    assert entry["runs_trained"] == len(rows) + len(spatial.AGGREGATIONS) - 1
    result = {
        "settings": {"model": "small_cnn", "epochs": 1, "batch_size": 32, "trials": 1, "seeds": 1},
        "rows": rows,
        "aggregation": entry.pop("aggregation"),
        "floors": spatial.floors(rows),
        "adding_up": spatial.adding_up(rows),
        "datasets": {"synth": {"built": "toy", **entry}},
    }
    # Every toy tumor patch holds a quarter of tumor: all fall in the top band, whose
    # AUROC is then the plain AUROC of the robust bins' rows.
    bands = spatial.robust_auroc_by_tumor_share(Path(by_method["erm"]["runs"][0]), patches)
    assert list(bands) == ["0-0.05", "0.05-0.2", "0.2-1"]
    assert bands["0-0.05"] == bands["0.05-0.2"] == {"auroc": None, "tumor_patches": 0}
    run = Path(by_method["erm"]["runs"][0])
    predictions = pd.read_parquet(run / "predictions" / "test.parquet")
    robust = ((predictions["label"] == 1) & (predictions["attribute"] == "tissue_ratio<0.5")) | (
        (predictions["label"] == 0) & (predictions["attribute"] == "tissue_ratio>=0.5")
    )
    assert bands["0.2-1"]["tumor_patches"] == int((robust & (predictions["label"] == 1)).sum())
    assert bands["0.2-1"]["auroc"] == pytest.approx(
        roc_auc_score(predictions["label"][robust], predictions["score"][robust])
    )
    assert by_method["erm"]["robust_auroc_by_tumor_share"]["0.2-1"]["auroc"]["mean"] == (
        pytest.approx(bands["0.2-1"]["auroc"])
    )
    context = {"command": "c", "date": "d", "machine": "m", "wall": "0:00:01"}
    text = spatial.markdown(result, context)
    assert text.startswith("## Spatial supervision\n") and "| spatial-mask+gerne |" in text
    card = spatial.card_section("spatial-mask", result)
    # What tests/test_methods_baselines.py asks of every card's benchmark section.
    assert re.search(r"## What our benchmark shows\n(.*\n)*\| synth \| 0\.5 \| \d", card)


def test_a_set_without_glass_is_grouped_by_class(tmp_path: Path) -> None:
    patches = write_toy_patch_set(tmp_path / "patches", n=80)
    assert spatial.group_attributes(patches) == ("tissue_ratio",)
    toy = PatchSet.open(patches)
    table = toy.table.assign(tissue_ratio=1.0)  # every patch full of tissue, as ocdc and bcss
    patches = tmp_path / "no-glass"
    write_patch_set(patches, table, np.asarray(toy.pixels), np.asarray(toy.masks), {})
    assert spatial.group_attributes(patches) == spatial.NO_GLASS
    split = spatial.grouped_split(patches, spatial.NO_GLASS)
    assert split.bin_counts == () and split.n_classes == 2
    settings = replace(spatial.Settings(), trials=1, seeds=1, epochs=1)
    runner = spatial.GroupsRunner(
        patches, tmp_path / "work", settings, expected=1, attributes=spatial.NO_GLASS
    )
    trial = spatial.random_trials("erm", 1)[0]
    config = runner.config(tmp_path / "run", spatial.TAU, trial, 0, "")
    assert config.attributes == ["none"] and config.taus == []
    assert spatial.feasible("erm", split) is None
