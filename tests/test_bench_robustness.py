"""bench/robustness.py: selection, aggregation, resuming and the docs section."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

from test_data import write_toy_patch_set
from unshortcut.errors import UnshortcutError


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "bench" / "robustness.py"
    spec = importlib.util.spec_from_file_location("bench_robustness", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


robustness = _load()


def _stat(mean: float, std: float = 0.0) -> dict:
    return {"mean": mean, "std": std, "values": [mean]}


def _row(method: str, tau: float, bca: float, wga: float) -> dict:
    return {
        "method": method,
        "tau": tau,
        "protocol": robustness.KNOWN.name,
        "balanced_accuracy": _stat(bca),
        "worst_group_accuracy": _stat(wga),
    }


def test_expected_runs_and_mean_std() -> None:
    cells = len(robustness.METHODS) * 2  # every registered method at two taus
    assert robustness.Settings().expected_runs() == (10 * cells, 2 * cells, 2 * cells, 6)
    assert robustness.Settings(seeds=1, val_unknown=False).expected_runs() == (10 * cells, 0, 0, 2)
    stat = robustness.mean_std([0.5, None, 0.7])
    assert stat["mean"] == pytest.approx(0.6)
    assert stat["std"] == pytest.approx(math.sqrt(0.02))  # ddof 1: ((0.1^2) * 2) / 1


def test_floors_line() -> None:
    rows = [
        _row("erm", 0.5, 0.880, 0.450),
        _row("gerne", 0.5, 0.860, 0.531),
        _row("erm", 0.75, 0.870, 0.400),
        _row("gerne", 0.75, 0.830, 0.420),
    ]
    assert robustness.floors(rows) == (
        "GERNE WGA - ERM WGA at tau=0.5: +8.1 points (floor +7), at tau=0.75: +2.0 points "
        "(floor +7); GERNE BCA within 3 points of ERM: no "
        "(GERNE - ERM BCA tau=0.5: -2.0 points, tau=0.75: -4.0 points)"
    )
    assert robustness.floors(rows[:2]).endswith(
        "within 3 points of ERM: yes (GERNE - ERM BCA tau=0.5: -2.0 points)"
    )
    assert robustness.floors(rows[::2]) is None


def test_replace_section_keeps_the_other_sections() -> None:
    text = "# Benchmarks\n\n## A\n\nold a\n\n## Robustness (synth)\n\nold\n\n## B\n\nb\n"
    new = "## Robustness (synth)\n\nnew\n"
    assert robustness.replace_section(text, new) == (
        "# Benchmarks\n\n## A\n\nold a\n\n## Robustness (synth)\n\nnew\n\n## B\n\nb\n"
    )
    last = "# Benchmarks\n\n## Robustness (synth)\n\nold\n"
    assert robustness.replace_section(last, new) == "# Benchmarks\n\n" + new
    other = "## Robustness (layouts)\n\nx\n"
    assert robustness.replace_section(text, other) == text + "\n" + other


def test_method_cards_quote_their_rows_beside_erm(tmp_path: Path) -> None:
    tables = {
        "synth": {"rows": [_row("erm", 0.5, 0.86, 0.351), _row("gerne", 0.5, 0.867, 0.719)]},
        "layouts": {
            "rows": [_row("gerne", 0.5, 0.70, 0.25)],
            "counts": {"train": {"patches": 3185, "tumor": 89}},
        },
    }
    card = tmp_path / "gerne.md"
    card.write_text("# GERNE\n\n## What our benchmark shows\n\nold\n\n## Notes\n\nkept\n")
    (tmp_path / "lff.md").write_text("# LfF\n")
    assert robustness.update_cards(tmp_path, tables) == [card]
    text = card.read_text()
    assert "| synth | 0.5 | 86.7 ± 0.0 | 71.9 ± 0.0 | 35.1 ± 0.0 |" in text
    assert "| layouts | 0.5 | 70.0 ± 0.0 | 25.0 ± 0.0 | n/a |" in text
    assert "Training patches (tumor / all): layouts 89 / 3185." in text
    assert "old" not in text and text.endswith("## Notes\n\nkept\n")
    assert (tmp_path / "lff.md").read_text() == "# LfF\n"  # no results: untouched


@pytest.mark.slow
def test_experiment_selects_on_validation_reuses_and_resumes(tmp_path: Path) -> None:
    patches = write_toy_patch_set(tmp_path / "patches", n=240)
    work = tmp_path / "work"
    settings = robustness.Settings(
        methods=("erm", "gerne"), trials=1, seeds=1, epochs=1, batch_size=32, bootstrap=0
    )
    lines: list[str] = []
    result = robustness.run_experiment(patches, work, settings, log=lines.append)
    assert lines[0] == (
        f"expected runs: 4 trials + 0 seeds + 2 ablation runs; 0 already finished in {work}"
    )
    assert lines[1].startswith("[1/6] erm tau=0.5 trial 0 seed 0: val WGA ")
    assert result["runs_trained"] == 6 and result["runs_reused"] == 0
    # The ablation: GERNE's chosen trial with joint BatchNorm, same seeds, own folders.
    assert [(r["method"], r["tau"], r["hparams"]["bn"]) for r in result["ablation"]] == [
        ("gerne@bn-joint", 0.5, "joint"),
        ("gerne@bn-joint", 0.75, "joint"),
    ]
    assert Path(result["ablation"][0]["runs"][0]) == work / "tau0.5" / "gerne@bn-joint" / (
        "trial0-seed0"
    )

    known = [r for r in result["rows"] if r["protocol"] == robustness.KNOWN.name]
    assert [(r["method"], r["tau"]) for r in known] == [
        ("erm", 0.5),
        ("gerne", 0.5),
        ("erm", 0.75),
        ("gerne", 0.75),
    ]
    assert known[1]["hparams"] == {  # trial 0: the defaults
        "c": 0.5,
        "beta": 0.5,
        "bn": "separate",
        "on_runaway": "stop",
        "lr": 0.01,
        "weight_decay": 1e-4,
    }
    for row in result["rows"]:
        run = Path(row["runs"][0])
        assert run == work / f"tau{row['tau']:g}" / row["method"] / "trial0-seed0"
        metrics = json.loads((run / "metrics.json").read_text())
        test = metrics["by_criterion"][row["criterion"]]["test"]
        for key in ("balanced_accuracy", "worst_group_accuracy", "robust_auroc"):
            assert row[key] == {"mean": test[key], "std": 0.0, "values": [test[key]]}
    wga = {(r["method"], r["tau"]): r["worst_group_accuracy"]["mean"] for r in known}
    gap = 100 * (wga[("gerne", 0.5)] - wga[("erm", 0.5)])
    assert result["floors"].startswith(f"GERNE WGA - ERM WGA at tau=0.5: {gap:+.1f} points")
    assert len(result["checkpoint_selection"]) == 8  # 2 methods x 2 taus x 2 criteria
    assert {r["status"] for r in result["runs"]} == {"finished"}

    section = robustness.markdown(
        "toy", result, {"command": "python x", "date": "d", "machine": "m", "wall": "0:00:01"}
    )
    assert section.startswith("## Robustness (toy)\n")
    assert section.count("| gerne | 0.75 |") == 4  # two protocols, two checkpoint rows
    assert f"Floors: {result['floors']}" in section

    # Interrupted runs: one with a checkpoint is resumed, one without restarted; the rest
    # are reused, and the tables come out the same (training is deterministic).
    (work / "tau0.75" / "gerne" / "trial0-seed0" / "metrics.json").unlink()
    (work / "tau0.5" / "erm" / "trial0-seed0" / "metrics.json").unlink()
    shutil.rmtree(work / "tau0.5" / "erm" / "trial0-seed0" / "checkpoints")
    lines.clear()
    again = robustness.run_experiment(patches, work, settings, log=lines.append)
    assert lines[0].endswith(f"4 already finished in {work}")
    assert again["runs_trained"] == 2 and again["runs_reused"] == 4
    assert again["rows"] == result["rows"]

    with pytest.raises(UnshortcutError, match=r"finished with other settings \(epochs\)"):
        robustness.run_experiment(patches, work, replace(settings, epochs=2), log=lines.append)
