"""The training loop: learning, run-folder contract, resume, determinism, honesty, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from test_data import write_toy_patch_set
from unshortcut.cli import app
from unshortcut.config import CRITERIA, TrainConfig, load_config, parse_hp
from unshortcut.errors import UnshortcutError
from unshortcut.evaluate import evaluate_run
from unshortcut.inference import load_run_data
from unshortcut.methods import get_method, method_names
from unshortcut.methods.erm import ERM
from unshortcut.runs import load_model, open_run
from unshortcut.sealed import seal
from unshortcut.tiling.patchset import replace_table
from unshortcut.train import LoopContext, reproducible, train, training_data

# One torch thread: on a shared 2-core machine OpenMP teams of 2 stall on each other.
FAST = {
    "epochs": 3,
    "batch_size": 32,
    "bootstrap": 20,
    "lr": 0.02,
    "device": "cpu",
    "num_threads": 1,
}


def _config(patches: Path, out: Path, **changes: Any) -> TrainConfig:
    return TrainConfig(patches=patches, out=out, **(FAST | changes))


@pytest.fixture(scope="module")
def patches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_patch_set(tmp_path_factory.mktemp("toy") / "patches", n=240)


@pytest.fixture(scope="module")
def reference_run(patches: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run that several tests compare against."""
    return train(_config(patches, tmp_path_factory.mktemp("ref") / "run"), progress=False)


def kill_after_epoch(config: TrainConfig, epoch: int) -> None:
    """Train ``config`` and stop it as Ctrl-C would once epoch ``epoch`` has ended."""

    def crash(ended: int) -> None:
        if ended == epoch:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False, on_epoch_end=crash)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_loop_learns_the_toy_task(reference_run: Path) -> None:
    history = [json.loads(line) for line in _read(reference_run / "history.jsonl").splitlines()]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["val"]["loss"] < history[0]["val"]["loss"]
    metrics = json.loads(_read(reference_run / "metrics.json"))
    assert metrics["test"]["accuracy"] > 0.9


def test_run_folder_contract(reference_run: Path) -> None:
    metrics = json.loads(_read(reference_run / "metrics.json"))
    selection = metrics["selection"]
    assert selection["criterion"] == "worst_group_accuracy"
    assert set(selection["by_criterion"]) == set(CRITERIA)
    for split in ("val", "test"):
        m = metrics[split]
        for key in ("accuracy", "balanced_accuracy", "group_balanced_accuracy", "auroc"):
            assert 0 <= m[key] <= 1
        assert len(m["worst_group_accuracy_ci"]) == 2
        assert set(m["groups"]) == set(metrics["group_names"])
        # Predictions are enough to recompute the metrics independently.
        pred = pd.read_parquet(reference_run / "predictions" / f"{split}.parquet")
        assert list(pred.columns) == [
            "patch_id", "image_id", "label", "group", "attribute", "score", "prediction",
            "loss", "trained_on",
        ]  # fmt: skip
        assert (pred["prediction"] == (pred["score"] >= 0.5)).all()
        assert not pred["trained_on"].any()
        # The loss recomputes from the stored probabilities, to float64 precision.
        picked = np.where(pred["label"] == 1, pred["score"], 1 - pred["score"])
        np.testing.assert_allclose(pred["loss"], -np.log(picked), rtol=1e-9, atol=1e-12)
        assert m["loss"] == pytest.approx(pred["loss"].mean(), rel=1e-12)
        correct = pred["prediction"] == pred["label"]
        assert m["accuracy"] == pytest.approx(correct.mean())
        per_group = correct.groupby(pred["group"]).mean()
        assert m["worst_group_accuracy"] == pytest.approx(per_group.min())
        for name, acc in per_group.items():
            assert m["groups"][name]["accuracy"] == pytest.approx(acc)
    config = json.loads(_read(reference_run / "config.json"))
    assert config["method"] == "erm" and config["hp"] == {}
    assert config["groups"]["group_names"] == metrics["group_names"]
    assert len(config["normalization"]["mean"]) == 3
    checkpoints = reference_run / "checkpoints"
    assert (checkpoints / "last.pt").is_file()
    for criterion in selection["by_criterion"]:
        assert (checkpoints / f"best-{criterion}.pt").is_file()
        assert (checkpoints / f"final-{criterion}.pt").is_file()
    # Criteria that chose the same epoch share one file.
    epochs = selection["by_criterion"]
    inodes = {(checkpoints / f"best-{c}.pt").stat().st_ino for c in epochs}
    assert len(inodes) == len(set(epochs.values()))


def test_resume_after_a_crash_equals_an_uninterrupted_run(
    patches: Path, reference_run: Path, tmp_path: Path
) -> None:
    config = _config(patches, tmp_path / "run")

    kill_after_epoch(config, 1)
    assert not (config.out / "metrics.json").exists()
    assert len(_read(config.out / "history.jsonl").splitlines()) == 2
    with pytest.raises(UnshortcutError, match="already holds files"):
        train(config, progress=False)
    train(config, resume=True, progress=False)
    assert _read(config.out / "metrics.json") == _read(reference_run / "metrics.json")
    assert _read(config.out / "history.jsonl") == _read(reference_run / "history.jsonl")


def test_same_seed_same_metrics_other_seed_other_metrics(
    patches: Path, reference_run: Path, tmp_path: Path
) -> None:
    again = train(_config(patches, tmp_path / "again"), progress=False)
    assert _read(again / "metrics.json") == _read(reference_run / "metrics.json")
    other = train(_config(patches, tmp_path / "other", seed=1, epochs=1), progress=False)
    first_ref = _read(reference_run / "history.jsonl").splitlines()[0]
    assert _read(other / "history.jsonl").splitlines()[0] != first_ref


def test_selection_never_reads_test_labels(
    patches: Path, reference_run: Path, tmp_path: Path
) -> None:
    def flip_test_labels(table: pd.DataFrame) -> None:
        test = table["split"] == "test"
        table.loc[test, "label"] = 1 - table.loc[test, "label"]

    flipped = _edit_table(patches, tmp_path / "flipped", flip_test_labels)

    seen: list[bool] = []
    config = _config(flipped, tmp_path / "run")
    run = train(
        config,
        progress=False,
        on_epoch_end=lambda e: seen.append((config.out / "predictions").exists()),
    )
    assert seen == [False, False, False]  # test predictions appear only at the end
    ours, ref = (json.loads(_read(p / "metrics.json")) for p in (run, reference_run))
    assert ours["selection"] == ref["selection"]
    assert ours["val"] == ref["val"]
    assert _read(run / "history.jsonl") == _read(reference_run / "history.jsonl")
    assert ours["test"]["accuracy"] == pytest.approx(1 - ref["test"]["accuracy"])


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
    patches: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    steps_per_epoch = math.ceil(144 / 32)
    original = ERM.loss

    def poisoned(self: ERM, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        calls["n"] += 1
        loss = original(self, model, batch)
        return loss * math.nan if calls["n"] == steps_per_epoch + 3 else loss

    monkeypatch.setattr(ERM, "loss", poisoned)
    config = _config(patches, tmp_path / "run")
    with pytest.raises(
        UnshortcutError, match=r"loss is nan at epoch 1, step 2.*last good checkpoint \(epoch 0\)"
    ):
        train(config, progress=False)
    state = torch.load(config.out / "checkpoints" / "last.pt", weights_only=False)
    assert state["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not (config.out / "metrics.json").exists()


def test_evaluate_rescoring_matches_the_run(reference_run: Path, patches: Path) -> None:
    folder, metrics = evaluate_run(reference_run, patches, name="again", device="cpu")
    assert folder == reference_run / "evaluation" / "again"
    stored = json.loads(_read(reference_run / "metrics.json"))
    for split in ("val", "test"):
        for key in ("accuracy", "worst_group_accuracy", "auroc", "worst_group_accuracy_ci"):
            assert metrics[split][key] == pytest.approx(stored[split][key])
    on_disk = pd.read_parquet(folder / "predictions" / "test.parquet")
    ref = pd.read_parquet(reference_run / "predictions" / "test.parquet")
    np.testing.assert_allclose(on_disk["score"], ref["score"], rtol=1e-5)
    model = load_model(open_run(reference_run))
    assert model.head.out_features == 2


def test_fit_auxiliary_is_deterministic_and_selects_on_validation(patches: Path) -> None:
    config = _config(patches, Path("unused"), augment=False)
    results = []
    for _ in range(2):
        data = training_data(config, torch.device("cpu"))
        ctx = LoopContext(config, data, torch.device("cpu"))
        with reproducible(config, torch.device("cpu")):
            model = ctx.fit_auxiliary(
                get_method("cb_erm")(ctx), epochs=2, select_by="worst_class_accuracy"
            )
            results.append(ctx.predict(model, "val"))
            plain = ctx.fit_auxiliary(get_method("erm")(ctx), epochs=1, lr_factor=0.5)
            assert ctx.features(plain, "val").shape == (len(ctx.val), plain.n_features)
    np.testing.assert_array_equal(results[0], results[1])
    assert results[0].shape == (len(data.splits["val"]), 2)
    assert "test" not in data.splits  # auxiliary training never loads the test split


def test_config_file_and_flags_merge(tmp_path: Path) -> None:
    file = tmp_path / "train.toml"
    file.write_text(
        'patches = "p"\nout = "r"\nepochs = 7\nlr = 0.5\nattributes = ["tissue_ratio"]\n'
        "[hp]\nalpha = 1\nbeta = 2\n",
        encoding="utf-8",
    )
    config = load_config(file, lr=0.1, hp=parse_hp(["beta=3.5", "name=x"]), taus=None)
    assert (config.epochs, config.lr, config.patches) == (7, 0.1, Path("p").resolve())
    assert config.hp == {"alpha": 1, "beta": 3.5, "name": "x"}
    with pytest.raises(UnshortcutError, match="select_by"):
        load_config(file, select_by=["median"])
    with pytest.raises(UnshortcutError, match="--hp"):
        parse_hp(["novalue"])


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, ["train", *map(str, args), "--quiet", "--epochs", "1"])


def _edit_table(source: Path, target: Path, edit: Any) -> Path:
    target.mkdir()
    for name in ("pixels.npy", "masks.npy", "manifest.json", "patches.parquet"):
        (target / name).write_bytes((source / name).read_bytes())
    table = pd.read_parquet(source / "patches.parquet")
    edit(table)
    replace_table(target, table)
    return target


def test_cli_bad_input_is_one_clear_line(patches: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    old = tmp_path / "old"
    old.mkdir()
    for name in ("pixels.npy", "masks.npy", "patches.parquet"):
        (old / name).write_bytes((patches / name).read_bytes())
    manifest = json.loads(_read(patches / "manifest.json")) | {"format_version": 99}
    (old / "manifest.json").write_text(json.dumps(seal(manifest)), encoding="utf-8")
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "manifest.json").write_text(_read(patches / "manifest.json"), encoding="utf-8")

    def one_class(table: pd.DataFrame) -> None:
        table.loc[table["split"] == "train", "label"] = 0

    cases = {
        "another version": (_cli(old, "--out", out), "version"),
        "missing": (_cli(missing, "--out", out), "missing"),
        "unknown method": (_cli(patches, "--out", out, "--method", "magic"), "unknown method"),
        "bad hp": (_cli(patches, "--out", out, "--hp", "beta=1"), "unknown hyperparameter"),
        "unknown attribute": (_cli(patches, "--out", out, "--attribute", "site"), "no column"),
        "tau": (_cli(patches, "--out", out, "--tau", "1.5"), "outside tissue_ratio's range"),
        "one class": (
            _cli(_edit_table(patches, tmp_path / "oc", one_class), "--out", out),
            "no tumor rows",
        ),
        "empty group": (
            _cli(patches, "--out", out, "--attribute", "tissue_ratio:0.46,0.54"),
            "empty training groups",
        ),
        "bad model": (_cli(patches, "--out", out, "--model", "vgg"), "unknown model"),
        "bad lr": (_cli(patches, "--out", out, "--lr", "-1"), "lr"),
    }
    for name, (result, expected) in cases.items():
        assert result.exit_code == 2, (name, result.output)
        assert "error:" in result.output and expected in result.output, (name, result.output)
        assert "Traceback" not in result.output, name
    assert not out.exists()  # refused before anything was written


def test_cli_refuses_a_used_run_folder_and_resume_without_a_run(
    patches: Path, tmp_path: Path
) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine", encoding="utf-8")
    result = _cli(patches, "--out", used)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (used / "notes.txt").exists()
    result = _cli(patches, "--out", tmp_path / "nothing", "--resume")
    assert result.exit_code == 2 and "no run to resume" in result.output


def test_one_class_validation_split_warns_and_reports_null(patches: Path, tmp_path: Path) -> None:
    def val_negative(table: pd.DataFrame) -> None:
        table.loc[table["split"] == "val", "label"] = 0

    edited = _edit_table(patches, tmp_path / "ps", val_negative)
    with pytest.warns(UserWarning, match="val split holds one class"):
        run = train(_config(edited, tmp_path / "run", epochs=1), progress=False)
    metrics = json.loads(_read(run / "metrics.json"))
    assert metrics["val"]["auroc"] is None
    assert metrics["test"]["auroc"] is not None


def test_cli_train_then_evaluate_prints_tables(patches: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _cli(patches, "--out", out, "--method", "cb_erm", "--select-by", "loss")
    assert result.exit_code == 0, result.output
    assert "tumor|tissue_ratio>=0.5" in result.output and "worst-group accuracy" in result.output
    result = CliRunner().invoke(app, ["evaluate", str(out), "--bootstrap", "10"])
    assert result.exit_code == 0, result.output
    assert (out / "evaluation" / "patches" / "metrics.json").is_file()


@pytest.mark.parametrize("name", method_names())
def test_every_registered_method_trains_and_resumes_exactly(
    name: str, patches: Path, tmp_path: Path
) -> None:
    config = _config(patches, tmp_path / "whole", method=name, epochs=2, bootstrap=0)
    whole = train(config, progress=False)

    resumed = config.model_copy(update={"out": tmp_path / "resumed"})
    kill_after_epoch(resumed, 0)
    train(resumed, resume=True, progress=False)
    assert _read(resumed.out / "metrics.json") == _read(whole / "metrics.json")


def test_cli_prints_metric_warnings_after_the_tables(patches: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _cli(patches, "--out", out)
    assert result.exit_code == 0, result.output
    # 48 validation patches in 4 groups: every group is below 30 patches.
    warning = "warning: val: group tumor|tissue_ratio>=0.5 has"
    assert warning in result.output
    assert result.output.index(warning) > result.output.index("headline metrics")
    result = CliRunner().invoke(app, ["evaluate", str(out), "--bootstrap", "10"])
    assert result.exit_code == 0, result.output
    assert "warning: test: group" in result.output and "(< 30)" in result.output


def test_evaluate_reproduces_a_dfr_run_and_predictions_recompute_it(
    patches: Path, tmp_path: Path
) -> None:
    run = train(_config(patches, tmp_path / "dfr", method="dfr", epochs=2), progress=False)
    metrics = json.loads(_read(run / "metrics.json"))
    val = pd.read_parquet(run / "predictions" / "val.parquet")
    assert val["trained_on"].sum() == len(val) - metrics["val_rows_scored"] > 0
    scored = val[~val["trained_on"]]
    correct = scored["prediction"] == scored["label"]
    assert metrics["val"]["n"] == len(scored)
    assert metrics["val"]["worst_group_accuracy"] == pytest.approx(
        correct.groupby(scored["group"]).mean().min()
    )
    assert metrics["val"]["loss"] == pytest.approx(scored["loss"].mean(), rel=1e-12)
    _, again = evaluate_run(run, bootstrap=metrics["val"]["bootstrap"]["replicates"])
    for split in ("val", "test"):
        for key in ("n", "worst_group_accuracy", "balanced_accuracy", "auroc", "robust_auroc",
                    "loss", "worst_group_accuracy_ci"):  # fmt: skip
            assert again[split][key] == pytest.approx(metrics[split][key], rel=1e-9), (split, key)


class _TwoOptimizers(ERM):
    """A method with an extra module, its own optimizer and two loss terms: a probe
    predicting the attribute bin from detached features, stepped before the model."""

    name = "toy_two_optimizers"

    def __init__(self, ctx: Any, **hp: Any) -> None:
        super().__init__(ctx, **hp)
        self.probe = torch.nn.Linear(16 * 8, ctx.train.n_attributes)
        self.probe_steps = 0

    def extra_modules(self) -> torch.nn.Module:
        return self.probe

    def optimizers(self, model: torch.nn.Module) -> dict[str, torch.optim.Optimizer]:
        return {
            "model": self.ctx.make_optimizer(model.parameters()),
            "probe": torch.optim.Adam(self.probe.parameters(), lr=1e-2),
        }

    def train_step(self, model: Any, batch: Any, optimizers: Any) -> dict[str, float]:
        out = model.outputs(batch.x)
        probe_loss = torch.nn.functional.cross_entropy(
            self.probe(out.features.detach()), batch.attribute
        )
        optimizers["probe"].zero_grad()
        probe_loss.backward()
        optimizers["probe"].step()
        self.probe_steps += 1
        loss = torch.nn.functional.cross_entropy(out.logits, batch.y)
        optimizers["model"].zero_grad()
        loss.backward()
        optimizers["model"].step()
        return {"loss": float(loss.detach()), "probe": float(probe_loss.detach())}

    def state_dict(self) -> dict[str, Any]:
        return {"probe_steps": self.probe_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.probe_steps = state["probe_steps"]


def test_a_method_with_its_own_optimizer_trains_logs_and_resumes_exactly(
    patches: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from unshortcut.methods import registry

    monkeypatch.setitem(registry._REGISTRY, _TwoOptimizers.name, _TwoOptimizers)
    config = _config(patches, tmp_path / "whole", method=_TwoOptimizers.name, model="small_cnn")
    whole = train(config, progress=False)
    history = [json.loads(line) for line in _read(whole / "history.jsonl").splitlines()]
    assert all(set(h["train"]) == {"loss", "probe"} for h in history)
    assert history[-1]["train"]["probe"] < history[0]["train"]["probe"]
    last = torch.load(whole / "checkpoints" / "last.pt", weights_only=False)
    assert set(last["optimizers"]) == {"model", "probe"}
    assert last["optimizers"]["probe"]["state"]  # Adam moments are checkpointed
    assert last["method"] == {"probe_steps": 3 * 5}  # 144 train rows / 32: 5 steps an epoch

    resumed = config.model_copy(update={"out": tmp_path / "resumed"})
    kill_after_epoch(resumed, 1)
    train(resumed, resume=True, progress=False)
    for name in ("metrics.json", "history.jsonl"):
        assert _read(resumed.out / name) == _read(whole / name)
    again = torch.load(resumed.out / "checkpoints" / "last.pt", weights_only=False)
    for key, value in last["extra"].items():
        torch.testing.assert_close(again["extra"][key], value, rtol=0, atol=0)


def test_a_run_opens_from_another_directory_and_evaluation_reads_only_val_and_test(
    patches: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(patches.parent)
    config = _config(Path(patches.name), tmp_path / "run", epochs=1)
    run = train(config, progress=False)
    saved = json.loads(_read(run / "config.json"))
    assert saved["patches"] == str(patches.resolve())
    monkeypatch.chdir(tmp_path)
    opened = open_run(run)
    data = load_run_data(
        opened.config.patches,
        device=torch.device("cpu"),
        splits=("val", "test"),
        scheme=opened.scheme,
        normalization=opened.normalization,
        robust_bins=opened.robust_bins,
    )
    assert set(data.tables) == {"val", "test"}  # the training split is never read
    _, metrics = evaluate_run(run, bootstrap=0)
    assert metrics["test"]["n"] == len(data.splits["test"])


def test_bf16_autocast_and_channels_last_train_when_asked(patches: Path, tmp_path: Path) -> None:
    config = _config(patches, tmp_path / "run", precision="bf16", channels_last="on")
    assert config.uses_bf16("cpu") and config.uses_channels_last("cpu")
    default = _config(patches, tmp_path / "x")
    assert not default.uses_bf16("cpu") and default.uses_bf16("cuda")
    assert not default.uses_channels_last("cpu") and default.uses_channels_last("cuda")
    run = train(config, progress=False)
    metrics = json.loads(_read(run / "metrics.json"))
    assert metrics["test"]["accuracy"] > 0.9  # the toy task is still learnt
    data = training_data(config, torch.device("cpu"))
    batch = next(data.loaders["train"].batches([np.arange(8)], prefetch=False))
    assert batch.x.is_contiguous(memory_format=torch.channels_last)
    raw = data.loaders["train"].read(np.arange(8))
    assert raw.x.dtype == torch.uint8  # what crosses to a GPU: 4x fewer bytes than float32


def test_tensorboard_event_files_hold_the_loss_terms_and_validation(
    patches: Path, tmp_path: Path
) -> None:
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="TensorBoard logging is an optional extra (pip install 'unshortcut[tensorboard]')",
    )
    run = train(
        _config(patches, tmp_path / "run", method="gerne", tensorboard=True), progress=False
    )
    events = accumulator.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_biased", "train/lr", "val/worst_group_accuracy"} <= tags
    history = [json.loads(line) for line in _read(run / "history.jsonl").splitlines()]
    logged = [e.value for e in events.Scalars("train/loss_biased")]
    assert logged == pytest.approx([h["train"]["loss_biased"] for h in history], rel=1e-6)
