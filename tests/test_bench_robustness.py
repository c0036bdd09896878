"""bench/robustness.py: its tables from the sweep, relaunch, adoption of the old layout, docs."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

from test_data import write_toy_patch_set
from unshortcut.sweep import adopt_runs, load_sweep, run_sweep


def _load() -> ModuleType:
    bench = Path(__file__).resolve().parents[1] / "bench"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))  # the script imports its sibling trial_runner.py
    path = bench / "robustness.py"
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


def test_mean_std() -> None:
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


TOY_SWEEP = """
name = "toy-robustness"
out = "sweep"
methods = ["erm", "gerne"]
taus = [0.5]
seeds = 2

[datasets]
toy = "patches"

[search]
trials = 1
protocols = ["train-known/val-known", "train-known/val-unknown"]

[train]
epochs = 1
batch_size = 32
bootstrap = 0
device = "cpu"
num_threads = 1

[ablations.gerne]
bn-joint = { bn = "joint" }
"""


def _tests(run: str, criterion: str, key: str) -> float:
    metrics = json.loads((Path(run) / "metrics.json").read_text())
    return metrics["by_criterion"][criterion]["test"][key]


@pytest.mark.slow
def test_sweep_tables_relaunch_and_adoption_of_the_old_layout(tmp_path: Path) -> None:
    write_toy_patch_set(tmp_path / "patches", n=240)
    toml = tmp_path / "toy.toml"
    toml.write_text(TOY_SWEEP, encoding="utf-8")
    config = load_sweep(toml)
    sweep = run_sweep(config, log=lambda _: None)
    entry = robustness.tables(sweep)["toy"]

    known, unknown = robustness.KNOWN.name, robustness.UNKNOWN.name
    assert [(r["method"], r["protocol"]) for r in entry["rows"]] == [
        ("erm", known),
        ("gerne", known),
        ("erm", unknown),
        ("gerne", unknown),
    ]
    for row in entry["rows"]:  # test values at the checkpoint of the row's criterion
        assert row["seeds_finished"] == row["seeds_run"] == 2
        for key in ("balanced_accuracy", "worst_group_accuracy", "robust_auroc"):
            expected = [_tests(run, row["criterion"], key) for run in row["runs"]]
            assert row[key]["values"] == expected
    assert [(r["method"], r["hparams"]["bn"]) for r in entry["ablation"]] == [
        ("gerne@bn-joint", "joint")
    ]
    assert entry["ablation"][0]["runs"] != entry["rows"][1]["runs"]
    # Checkpoint by validation BCA vs by WGA: the same runs, rescored, for erm and gerne.
    selection = entry["checkpoint_selection"]
    assert [(r["method"], r["selected_by"]) for r in selection] == [
        ("erm", "balanced_accuracy"),
        ("erm", "worst_group_accuracy"),
        ("gerne", "balanced_accuracy"),
        ("gerne", "worst_group_accuracy"),
    ]
    erm_runs = entry["rows"][0]["runs"]
    assert selection[0]["worst_group_accuracy"]["values"] == [
        _tests(run, "balanced_accuracy", "worst_group_accuracy") for run in erm_runs
    ]
    assert selection[1]["worst_group_accuracy"] == entry["rows"][0]["worst_group_accuracy"]
    assert entry["floors"].startswith("GERNE WGA - ERM WGA at tau=0.5: ")
    assert entry["counts"]["train"]["patches"] > 0
    assert entry["runs_trained"] == len(entry["runs"]) and entry["runs_reused"] == 0
    assert {r["status"] for r in entry["runs"]} == {"finished"}
    section = robustness.markdown(
        "toy", entry, {"command": "python x", "date": "d", "machine": "m", "wall": "0:00:01"}
    )
    assert section.startswith("## Robustness (toy)\n")
    assert section.count("| gerne | 0.5 |") == 4  # two protocols, two checkpoint rows
    assert section.count("| gerne@bn-joint | 0.5 |") == 1

    # Relaunched through the script: every run is reused and the tables come out the same.
    results, doc, cards = tmp_path / "results", tmp_path / "benchmarks.md", tmp_path / "cards"
    results.mkdir()
    cards.mkdir()
    doc.write_text("# Benchmarks\n")
    (cards / "gerne.md").write_text("# GERNE\n")
    robustness.main(
        ["--config", str(toml), "--results", str(results), "--doc", str(doc), "--cards", str(cards)]
    )
    written = json.loads((results / "robustness.json").read_text())["toy"]
    assert written["runs_trained"] == 0 and written["runs_reused"] == len(entry["runs"])
    assert written["rows"] == json.loads(json.dumps(entry["rows"]))
    assert "## Robustness (toy)" in doc.read_text()
    assert "| toy | 0.5 |" in (cards / "gerne.md").read_text()

    # The pre-sweep layout, adopted into a fresh sweep folder: nothing to train, same numbers.
    old = tmp_path / "old"
    locate = robustness.old_layout(old)
    for run in sweep.runs:
        shutil.copytree(run.folder, locate(run))
    assert locate(sweep.runs[0]) == old / "toy" / "tau0.5" / "erm" / "trial0-seed0"
    fresh = load_sweep(toml, out=tmp_path / "fresh")
    assert adopt_runs(fresh, locate, log=lambda _: None) == {"adopted": len(sweep.runs)}
    assert adopt_runs(fresh, locate, log=lambda _: None) == {"already there": len(sweep.runs)}
    adopted = robustness.tables(run_sweep(fresh, log=lambda _: None))["toy"]
    assert adopted["runs_trained"] == 0
    for part in ("rows", "checkpoint_selection", "ablation"):
        assert [r["worst_group_accuracy"] for r in adopted[part]] == [
            r["worst_group_accuracy"] for r in entry[part]
        ]
