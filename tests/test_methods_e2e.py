"""End-to-end smoke test of every registered method through the real training loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from test_data import write_toy_patch_set
from unshortcut.config import TrainConfig
from unshortcut.methods import method_names
from unshortcut.train import train


@pytest.fixture(scope="module")
def patches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_patch_set(tmp_path_factory.mktemp("toy") / "patches", n=240)


@pytest.mark.slow
@pytest.mark.parametrize("name", method_names())
def test_method_trains_end_to_end(name: str, patches: Path, tmp_path: Path) -> None:
    # The toy task is learned perfectly in one epoch at lr 0.02, which leaves JTT's
    # identification model no errors; a tiny learning rate keeps some.
    lr = 1e-4 if name == "jtt" else 0.02
    config = TrainConfig(
        patches=patches,
        out=tmp_path / name,
        method=name,
        epochs=2,
        batch_size=32,
        bootstrap=0,
        lr=lr,
        device="cpu",
    )
    run = train(config, progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["val"]["worst_group_accuracy"] <= 1.0
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(math.isfinite(h["train_loss"]) for h in history)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["method"]
    if name == "gerne_unknown":
        assert state["report"]["pseudo_minority_rows"] > 0
        assert 0.0 <= state["report"]["recall"] <= 1.0
    if name == "jtt":
        assert len(state["error_set"]) > 0
    if name == "groupdro":
        assert float(state["q"].sum()) == pytest.approx(1.0)
    n_val = len(pd.read_parquet(run / "predictions" / "val.parquet"))
    if name == "gerne_unknown":
        report = metrics["method_report"]["pseudo_groups"]
        assert report == {k: state["report"][k] for k in report}
    if name == "dfr":
        # DFR fits its head on half of the validation images: selection and the
        # reported validation metrics use only the other half.
        assert 0 < metrics["val_rows_scored"] < n_val
        assert metrics["val"]["n"] == metrics["val_rows_scored"]
    else:
        assert metrics["val_rows_scored"] == n_val == metrics["val"]["n"]
