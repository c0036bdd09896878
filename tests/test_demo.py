"""`unshortcut demo`: the first command a new user runs must work end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from unshortcut.cli import app


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--images", "8", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    for stage in ("1/5 synth", "2/5 patchify", "3/5 audit", "4/5 train", "5/5 report"):
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
