"""Sweeps: hashed run folders, validation-only selection, relaunch and resume, launchers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from test_data import write_toy_patch_set
from unshortcut.cli import app
from unshortcut.config import TrainConfig
from unshortcut.errors import UnshortcutError
from unshortcut.runs import config_differences, verify_run
from unshortcut.search import read_run
from unshortcut.sweep import load_sweep, run_sweep, sweep_status, write_results
from unshortcut.sweep.plan import summary_stat
from unshortcut.sweep.store import adopt_run, execute, run_folder, run_key, run_status
from unshortcut.train import train

SWEEP = """
name = "toy"
out = "sweep"
methods = ["erm", "gerne"]
taus = [0.5]
seeds = 2

[datasets]
toy = "patches"

[search]
trials = 2
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


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    write_toy_patch_set(root / "patches", n=240)
    (root / "toy.toml").write_text(SWEEP, encoding="utf-8")
    return root / "toy.toml"


def test_run_keys_ignore_where_and_how_fast_but_not_what(tmp_path: Path) -> None:
    base = TrainConfig(patches=tmp_path, out=tmp_path / "a", epochs=3)
    assert run_key(base) == run_key(base.model_copy(update={"out": tmp_path / "b"}))
    assert run_key(base) == run_key(base.model_copy(update={"num_threads": 2}))
    assert run_key(base) != run_key(base.model_copy(update={"epochs": 4}))
    assert run_key(base) != run_key(base.model_copy(update={"hp": {"x": 1}}))
    assert run_folder(tmp_path, base).name == f"erm-{run_key(base)}"


def test_sweep_file_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nout = "o"\n[datasets]\nd = "p"\n[train]\nseed = 3\n')
    with pytest.raises(UnshortcutError, match=r"bad.toml: train: .*set per run by the sweep.*seed"):
        load_sweep(bad)
    bad.write_text('name = "x"\nout = "o"\nmethods = ["magic"]\n[datasets]\nd = "p"\n')
    with pytest.raises(UnshortcutError, match="unknown method 'magic'"):
        load_sweep(bad)
    bad.write_text('name = "x"\nout = "o"\n[datasets]\nd = "p"\n[search]\nprotocols = ["p"]\n')
    with pytest.raises(UnshortcutError, match=r"search\.protocols"):
        load_sweep(bad)
    with pytest.raises(UnshortcutError, match="unreadable sweep file"):
        load_sweep(tmp_path / "missing.toml")


def test_summary_stat_matches_a_t_interval() -> None:
    stat = summary_stat([0.5, 0.7, None, 0.6])
    assert stat["mean"] == pytest.approx(0.6) and stat["std"] == pytest.approx(0.1)
    # t(0.975, 2) = 4.303; half width 4.303 * 0.1 / sqrt(3)
    assert stat["ci95"] == pytest.approx([0.6 - 0.24843, 0.6 + 0.24843], abs=1e-4)
    assert summary_stat([None])["mean"] is None


@pytest.mark.slow
def test_sweep_selects_on_validation_skips_finished_and_resumes_interrupted(
    sweep_file: Path,
) -> None:
    config = load_sweep(sweep_file)
    assert config.out == sweep_file.parent / "sweep"
    lines: list[str] = []
    result = run_sweep(config, log=lines.append)
    assert lines[0] == "sweep toy: 4 trial runs, then up to 6 seed runs"
    # 4 trials (seed 0), then per protocol the chosen trial's seed 1 (seed 0 is reused),
    # and the ablation at seeds 0 and 1: at most 4 + 2 + 2 + 2 new runs.
    statuses = list(result.statuses.values())
    assert set(statuses) == {"finished"} and 6 <= len(statuses) <= 10
    assert [(r["protocol"], r["method"]) for r in result.rows] == [
        ("train-known/val-known", "erm"),
        ("train-known/val-known", "gerne"),
        ("train-known/val-known", "gerne@bn-joint"),
        ("train-known/val-unknown", "erm"),
        ("train-known/val-unknown", "gerne"),
    ]
    for row in result.rows:
        assert row["seeds_finished"] == row["seeds_run"] == 2
        runs = [Path(p) for p in row["runs"]]
        tests = [
            json.loads((r / "metrics.json").read_text())["by_criterion"][row["criterion"]]["test"]
            for r in runs
        ]
        assert row["worst_group_accuracy"]["values"] == [t["worst_group_accuracy"] for t in tests]
        if "@" in row["method"]:
            continue
        # The chosen trial is the best of its method's trials on the protocol's validation
        # criterion (seed 0 is the trial run itself).
        trial_runs = [
            r.folder
            for r in result.runs
            if r.method == row["method"] and r.variant == "" and r.seed == 0
        ]
        scores = [read_run(r).val_scores[row["criterion"]] for r in trial_runs]
        assert read_run(runs[0]).val_scores[row["criterion"]] == max(scores)
    ablation = next(r for r in result.rows if r["method"] == "gerne@bn-joint")
    assert ablation["hparams"]["bn"] == "joint"
    written = write_results(result)
    saved = json.loads(written.read_text())
    assert saved["rows"] == json.loads(json.dumps(result.rows))
    assert all(run["status"] == "finished" for run in saved["runs"])

    # Relaunch: nothing is trained again.
    lines.clear()
    again = run_sweep(config, log=lines.append)
    assert again.rows == result.rows
    assert all("(reused;" in line for line in lines[1:] if line.startswith("["))
    # A run killed after its checkpoint is resumed; one without a checkpoint restarts;
    # both end exactly as before.
    interrupted, restarted = (Path(p) for p in result.rows[0]["runs"])
    reference = {r: (r / "metrics.json").read_text() for r in (interrupted, restarted)}
    (interrupted / "metrics.json").unlink()
    shutil.rmtree(restarted)
    assert (
        sweep_status(config)["trials"]["interrupted"] + sweep_status(config)["trials"]["pending"]
        >= 1
    )
    lines.clear()
    resumed = run_sweep(config, log=lines.append)
    assert resumed.rows == result.rows
    for run, text in reference.items():
        assert (run / "metrics.json").read_text() == text
    assert sum("(reused;" not in line for line in lines[1:] if line.startswith("[")) == 2
    seed_runs = {p for row in result.rows for p in row["runs"]}
    assert sweep_status(config)["seeds"] == {"finished": len(seed_runs)}


@pytest.mark.slow
def test_cli_status_then_sweep_with_two_local_workers(sweep_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "parallel"
    runner = CliRunner()
    status = runner.invoke(app, ["sweep", str(sweep_file), "--out", str(out), "--status"])
    assert status.exit_code == 0, status.output
    assert "4 pending" in status.output and "waiting for the trials" in status.output
    assert f"sweep toy: {out}" in status.output.replace("\n", "")  # named whole, not wrapped
    result = runner.invoke(app, ["sweep", str(sweep_file), "--out", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    parallel = json.loads((out / "results.json").read_text())["rows"]
    serial = run_sweep(load_sweep(sweep_file), log=lambda _: None).rows
    assert [r["worst_group_accuracy"] for r in parallel] == [
        r["worst_group_accuracy"] for r in json.loads(json.dumps(serial))
    ]
    assert "gerne@bn-joint" in result.output


@pytest.mark.slow
def test_ray_launcher_on_a_local_instance_gives_the_same_results(
    sweep_file: Path, tmp_path: Path
) -> None:
    ray = pytest.importorskip(
        "ray", reason="Ray is an optional extra (pip install 'unshortcut[ray]')"
    )
    config = load_sweep(sweep_file, out=tmp_path / "ray", methods=["erm"])
    config = config.model_copy(
        update={"launcher": config.launcher.model_copy(update={"kind": "ray", "workers": 2})}
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = run_sweep(config, log=lambda _: None).rows
    finally:
        ray.shutdown()
    serial = load_sweep(sweep_file, methods=["erm"])
    expected = run_sweep(serial, log=lambda _: None).rows
    assert [r["worst_group_accuracy"] for r in rows] == [
        r["worst_group_accuracy"] for r in expected
    ]


def test_a_saved_config_without_a_newer_field_counts_as_its_default(tmp_path: Path) -> None:
    config = TrainConfig(patches=tmp_path / "p", out=tmp_path / "run", taus=[0.5])
    saved = config.to_json_dict()
    del saved["method_attributes"]  # written before TrainConfig had the field
    assert config_differences(saved, config) == []
    grouped = config.model_copy(update={"method_attributes": ["site"]})
    assert config_differences(saved, grouped) == ["method_attributes"]
    assert config_differences(saved | {"epochs": 3}, config) == ["epochs"]


@pytest.mark.slow
def test_adopt_run_takes_the_same_settings_and_refuses_others(tmp_path: Path) -> None:
    patches = write_toy_patch_set(tmp_path / "patches", n=120)
    old = TrainConfig(
        patches=patches,
        out=tmp_path / "old" / "erm-run",
        taus=[0.5],
        epochs=1,
        batch_size=32,
        bootstrap=0,
        device="cpu",
        num_threads=1,
    )
    train(old, progress=False)
    # A run from before TrainConfig had a field: its config.json lacks it.
    saved = json.loads((old.out / "config.json").read_text())
    del saved["method_attributes"], saved["content_sha256"]  # nor was it sealed then
    (old.out / "config.json").write_text(json.dumps(saved))

    planned = old.model_copy(update={"out": run_folder(tmp_path / "sweep", old)})
    assert adopt_run(old.out, planned) is True
    assert run_status(planned.out) == "finished"
    adopted = json.loads((planned.out / "config.json").read_text())
    assert adopted["out"] == str(planned.out) and adopted["method_attributes"] == []
    assert os.path.samefile(planned.out / "metrics.json", old.out / "metrics.json")
    assert json.loads((old.out / "config.json").read_text()) == saved  # the source is intact
    assert (planned.out / "adopted.txt").read_text() == f"{old.out}\n"
    assert verify_run(planned.out) == []  # checksums.json speaks for the new config.json
    assert execute(planned.model_dump(mode="json")) == ("finished", [])  # the sweep reuses it
    assert adopt_run(old.out, planned) is False  # twice: nothing changes

    # The same patch set elsewhere (same bytes) is the same data; another one is not.
    copy = Path(shutil.copytree(patches, tmp_path / "copy"))
    moved = old.model_copy(update={"patches": copy})
    assert adopt_run(old.out, moved.model_copy(update={"out": run_folder(tmp_path / "b", moved)}))
    other = old.model_copy(update={"patches": write_toy_patch_set(tmp_path / "other", seed=1)})
    with pytest.raises(UnshortcutError, match=r"other settings than the sweep's run \(patches\)"):
        adopt_run(old.out, other.model_copy(update={"out": run_folder(tmp_path / "c", other)}))
    longer = old.model_copy(update={"epochs": 2, "hp": {"x": 1}})
    with pytest.raises(
        UnshortcutError,
        match=r"erm-run: trained with other settings than the sweep's run \(epochs, hp\.x\); "
        "not adopted",
    ):
        adopt_run(old.out, longer.model_copy(update={"out": run_folder(tmp_path / "d", longer)}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnshortcutError, match=r"empty: not a finished run"):
        adopt_run(tmp_path / "empty", planned)
    busy = old.model_copy(update={"out": run_folder(tmp_path / "e", old)})
    (busy.out / "checkpoints").mkdir(parents=True)  # a run the sweep began itself
    with pytest.raises(UnshortcutError, match="already holds another run; delete it"):
        adopt_run(old.out, busy)
