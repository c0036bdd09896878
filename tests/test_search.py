"""Hyperparameter search: deterministic trials, feasibility, and validation-only selection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from test_methods_fake import make_split
from unshortcut.errors import UnshortcutError
from unshortcut.methods import get_method
from unshortcut.methods.gerne import beta_max
from unshortcut.search import (
    PROTOCOLS,
    grid_trials,
    random_trials,
    select_best,
    stable_seed,
    trial_seed,
)


def test_trials_are_deterministic_and_per_hyperparameter() -> None:
    first = random_trials("groupdro", 6, base_seed=3)
    again = random_trials("groupdro", 6, base_seed=3)
    assert [t.to_dict() for t in first] == [t.to_dict() for t in again]
    assert first[0].hparams == {"eta": 0.01, "C": 0.0}  # trial 0: defaults
    assert len({t.hparams["eta"] for t in first[1:]}) == 5
    assert all(0.001 <= t.hparams["eta"] <= 0.1 for t in first)
    assert [t.seed for t in first] == [trial_seed("groupdro", i, 3) for i in range(6)]
    # More trials leave earlier ones alone; another base seed changes them.
    assert [t.to_dict() for t in random_trials("groupdro", 3, base_seed=3)] == [
        t.to_dict() for t in first[:3]
    ]
    assert random_trials("groupdro", 2, base_seed=4)[1].hparams != first[1].hparams
    # Known value of the stable hash (md5 of the repr): identical on every machine.
    assert stable_seed("gerne", 1, 0) == stable_seed("gerne", 1, 0) != stable_seed("gerne", 2, 0)
    assert isinstance(stable_seed("x"), int) and 0 <= stable_seed("x") < 2**31


def test_integer_and_log_ranges() -> None:
    for trial in random_trials("jtt", 20):
        assert isinstance(trial.hparams["lambda_up"], int) and 2 <= trial.hparams["lambda_up"] <= 50
    spec = get_method("dfr").hparams["C"]
    np.testing.assert_allclose(spec.grid(3), [0.01, np.sqrt(0.1), 10.0])
    assert get_method("jtt").hparams["epochs"].grid(3) == [1, 3, 5]


def test_gerne_draws_the_strength_over_its_feasible_range() -> None:
    train = make_split([[95, 5], [5, 95]])  # alpha_max = 0.95: s_max = 0.95 / 0.45
    s_max = 0.95 / 0.45
    trials = random_trials("gerne", 200, train=train)
    alpha = train.attribute_given_class()
    strengths = []
    for trial in trials[1:]:
        c, beta = trial.hparams["c"], trial.hparams["beta"]
        assert c in (0.5, 1.0)
        assert -1 < beta <= beta_max(alpha, c) + 1e-9
        strengths.append(c * (beta + 1))
    strengths = np.array(strengths)
    assert strengths.min() >= 0.5 and strengths.max() <= s_max + 1e-9
    # Uniform over [0.5, s_max]: a third below plain resampling (s = 1), none at beta = -1.
    assert np.mean(strengths < 1) == pytest.approx(0.5 / (s_max - 0.5), abs=0.1)
    assert {t.hparams["c"] for t in trials[1:]} == {0.5, 1.0}
    assert trials[0].hparams == {"c": 0.5, "beta": 0.5, "bn": "separate", "on_runaway": "stop"}
    grid = grid_trials("gerne", points=3, train=train)
    assert [(t.hparams["c"], round(t.hparams["c"] * (t.hparams["beta"] + 1), 6)) for t in grid] == [
        (c, round(s, 6)) for c in (0.5, 1.0) for s in np.linspace(0.5, s_max, 3)
    ]


def test_gerne_unknown_draws_t_on_a_log_scale() -> None:
    train = make_split([[500, 500], [500, 500]])
    ts = np.array([t.hparams["t"] for t in random_trials("gerne_unknown", 200, train=train)[1:]])
    assert ts.min() >= 1e-3 and ts.max() <= 0.45
    # log-uniform on [1e-3, 0.45]: the median is the geometric mean, about 0.021.
    assert np.median(ts) == pytest.approx(np.sqrt(1e-3 * 0.45), rel=0.35)


def _write_run(folder: Path, method: str, hp: dict, val: tuple, test: tuple) -> Path:
    """A finished run with (worst_group, worst_class) accuracies on val and test."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"method": method, "hp": hp}))
    criteria = ("worst_group_accuracy", "worst_class_accuracy")
    by_criterion = {
        c: {"epoch": 1, "val": {c: v}, "test": {c: t}}
        for c, v, t in zip(criteria, val, test, strict=True)
    }
    metrics = {"val": {}, "test": {}, "by_criterion": by_criterion}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_selection_uses_validation_only(tmp_path: Path) -> None:
    runs = [
        # gerne a: better on val, far worse on test; b: the reverse
        _write_run(tmp_path / "ga", "gerne", {"beta": 1}, (0.8, 0.7), (0.1, 0.1)),
        _write_run(tmp_path / "gb", "gerne", {"beta": 2}, (0.6, 0.9), (0.99, 0.99)),
        _write_run(tmp_path / "e", "erm", {}, (0.5, 0.5), (0.9, 0.9)),
        _write_run(tmp_path / "d1", "dfr", {"balance": "group"}, (0.7, 0.6), (0.2, 0.2)),
        _write_run(tmp_path / "d2", "dfr", {"balance": "class"}, (0.4, 0.5), (0.8, 0.8)),
    ]
    best = select_best(runs)
    assert set(best) == {p.name for p in PROTOCOLS}
    known = best["train-known/val-known"]
    assert known["gerne"].path.name == "ga" and known["dfr"].path.name == "d1"
    assert best["train-known/val-unknown"]["gerne"].path.name == "gb"  # worst_class_accuracy
    assert best["train-known/val-unknown"]["dfr"].path.name == "d2"  # no val attributes
    assert "gerne" not in best["train-unknown/val-known"]  # needs training attributes
    assert best["train-unknown/val-unknown"].keys() == {"erm", "dfr"}
    # Test values are never read: garbage there changes nothing.
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["test"] = "not read"
        for entry in metrics["by_criterion"].values():
            entry["test"] = {"worst_group_accuracy": 1e9, "worst_class_accuracy": 1e9}
        (run / "metrics.json").write_text(json.dumps(metrics))
    again = select_best(runs)
    assert {p: {m: r.path for m, r in c.items()} for p, c in again.items()} == {
        p: {m: r.path for m, r in c.items()} for p, c in best.items()
    }
    assert all("test" not in str(r.val_scores) for c in again.values() for r in c.values())


def test_selection_refuses_unfinished_runs(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(UnshortcutError, match="not a finished run"):
        select_best([tmp_path / "run"])


def test_every_method_searches_the_shared_training_hyperparameters() -> None:
    from unshortcut.config import TrainConfig
    from unshortcut.search import TRAINING_HPARAMS

    trials = random_trials("erm", 4, base_seed=0)
    defaults = {k: TrainConfig.model_fields[k].default for k in TRAINING_HPARAMS}
    assert trials[0].training == defaults == {"lr": 0.01, "weight_decay": 1e-4}
    drawn = [t.training for t in trials[1:]]
    assert len({t["lr"] for t in drawn}) == 3  # ERM has no own hparams: trials still differ
    for t in drawn:
        assert 1e-3 <= t["lr"] <= 5e-2 and 1e-6 <= t["weight_decay"] <= 1e-2
    assert [t.training for t in random_trials("erm", 4, base_seed=0)] == [
        t.training for t in trials
    ]
