"""`unshortcut demo`: the first command a new user runs must work end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from unshortcut.cli import app


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--images", "8", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    stages = ("1/6 synth", "2/6 patchify", "3/6 audit", "4/6 train", "5/6 report", "6/6 predict")
    for stage in stages:
        assert stage in result.output
    assert "tissue_ratio alone predicts the label with AUROC" in result.output
    assert "verdict: " in result.output
    assert f"report: {out / 'report.html'}" in result.output.replace("\n", "")
    html = (out / "report.html").read_text()
    assert "erm" in html and "gerne" in html and "<img" in html
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"erm", "gerne"}
    for scores in summary.values():
        assert 0 <= scores["worst_group_accuracy"] <= scores["balanced_accuracy"] <= 1
    for folder in ("data/images", "patches", "audit", "runs/erm", "runs/gerne"):
        assert (out / folder).is_dir()
    # The heat map is of an image no run trained on.
    patches = pd.read_parquet(out / "patches" / "patches.parquet")
    (heatmap,) = (out / "heatmaps").iterdir()
    assert set(patches.loc[patches["image_id"] == heatmap.name, "split"]) == {"test"}
    assert (heatmap / "overlay.png").stat().st_size > 0
