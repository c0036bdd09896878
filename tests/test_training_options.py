"""Training options for real slides: --pretrained, --hed-jitter, --stain-normalization,
and the warning for a classifier that predicts one class everywhere."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from test_data import write_toy_patch_set
from test_pretrained import torchvision_resnet_state, write_checkpoint
from unshortcut.cli import app
from unshortcut.config import TrainConfig, load_config
from unshortcut.data import Augmentation, Normalization, SplitData, channel_stats
from unshortcut.errors import UnshortcutError
from unshortcut.evaluate import evaluate_run
from unshortcut.inference import load_run_data, one_class_warning
from unshortcut.methods import GroupedSplit
from unshortcut.runs import load_model, open_run
from unshortcut.sealed import seal
from unshortcut.stain import STAIN_CACHE, HedJitter
from unshortcut.tiling.patchset import PatchSet, write_patch_set
from unshortcut.train import LoopContext, reproducible, train, training_data

FAST = {"epochs": 1, "batch_size": 32, "bootstrap": 0, "device": "cpu", "num_threads": 1}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def patches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_patch_set(tmp_path_factory.mktemp("toy") / "patches", n=120)


def _config(patches: Path, out: Path, **changes: Any) -> TrainConfig:
    return TrainConfig(patches=patches, out=out, **(FAST | changes))


# --------------------------------------------------------------------------- --pretrained


def test_pretrained_setting_reads_names_files_and_imagenet(tmp_path: Path) -> None:
    base = {"patches": tmp_path, "out": tmp_path / "run"}
    assert TrainConfig(**base).pretrained is False
    assert TrainConfig(**base, pretrained="imagenet").pretrained is True
    assert TrainConfig(**base, pretrained="").pretrained is False
    assert TrainConfig(**base, pretrained="hf-hub:org/repo").pretrained == "hf-hub:org/repo"
    relative = TrainConfig(**base, pretrained="weights/encoder.pth").pretrained
    assert relative == str(Path("weights/encoder.pth").resolve())
    flags = load_config(None, patches=tmp_path, out=tmp_path / "r", pretrained="IMAGENET")
    assert flags.pretrained is True


def test_run_starts_from_the_checkpoint_and_never_needs_it_again(
    patches: Path, tmp_path: Path
) -> None:
    state = torchvision_resnet_state(18, seed=3)
    checkpoint = write_checkpoint(state, tmp_path / "encoder.pth")
    config = _config(patches, tmp_path / "run", model="resnet18", pretrained=str(checkpoint))
    with reproducible(config, torch.device("cpu")):
        ctx = LoopContext(config, training_data(config, torch.device("cpu")), torch.device("cpu"))
        first = ctx.new_model().backbone.conv1.weight.detach()
    torch.testing.assert_close(first, state["conv1.weight"])  # 3 channels: copied as is
    run = train(config, progress=False)
    saved = json.loads((run / "config.json").read_text())
    assert saved["pretrained"] == str(checkpoint.resolve())
    assert len(saved["pretrained_sha256"]) == 64
    checkpoint.unlink()  # a finished run loads and evaluates without the file
    model = load_model(open_run(run))
    assert model.backbone.conv1.weight.shape == (64, 3, 7, 7)
    _, metrics = evaluate_run(run, device="cpu")
    recorded = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] == pytest.approx(recorded["test"]["accuracy"])


def test_cli_missing_checkpoint_is_a_one_line_error(patches: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["train", str(patches), "--out", str(tmp_path / "run"), "--model", "resnet18",
         "--pretrained", str(tmp_path / "absent.pth"), "--epochs", "1", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "absent.pth: no such checkpoint file" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- HED jitter


def _loader(patchset: PatchSet, normalization: Normalization) -> SplitData:
    rows = patchset.rows("train")
    grouped = GroupedSplit.from_attributes(
        labels=patchset.table["label"].to_numpy()[rows],
        attributes=np.zeros(len(rows), np.int64),
        image_ids=patchset.table["image_id"].to_numpy()[rows],
        n_classes=2,
        n_attributes=1,
    )
    return SplitData(patchset.pixels, None, rows, grouped, normalization, torch.device("cpu"))


def test_hed_jitter_in_the_training_loader_is_seeded_in_range_and_before_normalisation(
    patches: Path,
) -> None:
    patchset = PatchSet.open(patches)
    stats = channel_stats(patchset.pixels, patchset.rows("train"))
    loader = _loader(patchset, stats)
    index = np.arange(16)
    jitter_only = Augmentation.for_training(augment=False, hed_jitter=0.2)
    assert jitter_only is not None and jitter_only.stain == HedJitter(0.2, 0.2)

    def batch(seed: int) -> torch.Tensor:
        return loader.load(index, jitter_only, torch.Generator().manual_seed(seed)).x

    plain = loader.load(index).x
    first, again, other = batch(7), batch(7), batch(8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.allclose(first, plain, atol=1e-3)
    # Jittered before the normalisation: undone, the pixels lie in the image range.
    mean = torch.tensor(stats.mean).view(1, -1, 1, 1)
    std = torch.tensor(stats.std).view(1, -1, 1, 1)
    raw = first.double() * std + mean
    assert raw.min() >= -1e-3 and raw.max() <= 255 + 1e-3
    # The same draw as HedJitter on the raw batch, then the normalisation.
    expected = HedJitter(0.2, 0.2)(
        torch.from_numpy(patchset.pixels[patchset.rows("train")[index]]).float(),
        torch.Generator().manual_seed(7),
    )
    torch.testing.assert_close(raw.float(), expected, atol=1e-3, rtol=1e-5)
    assert Augmentation.for_training(augment=False, hed_jitter=0.0) is None


def _dark_background_copy(patches: Path, out: Path) -> Path:
    """The toy set with a manifest saying its images have a dark background (multimodal)."""
    source = PatchSet.open(patches)
    write_patch_set(out, source.table, np.asarray(source.pixels), np.asarray(source.masks), {})
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["images"] = {"img": {"tissue_polarity": "dark-background"}}
    manifest_path.write_text(json.dumps(seal(manifest)))
    return out


@pytest.mark.parametrize(
    "option", [{"hed_jitter": 0.05}, {"stain_normalization": "macenko"}], ids=["hed", "macenko"]
)
def test_stain_options_refuse_multimodal_patch_sets(
    patches: Path, tmp_path: Path, option: dict[str, Any]
) -> None:
    dark = _dark_background_copy(patches, tmp_path / "dark")
    with pytest.raises(UnshortcutError, match="dark background"):
        train(_config(dark, tmp_path / "run", **option), progress=False)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- stain normalisation


def test_stain_normalisation_is_fitted_once_and_scores_alike_everywhere(
    patches: Path, tmp_path: Path
) -> None:
    run = train(_config(patches, tmp_path / "run", stain_normalization="reinhard"), progress=False)
    saved = json.loads((run / "config.json").read_text())["normalization"]
    assert saved["stain"]["method"] == "reinhard"
    copies = list((patches / STAIN_CACHE).glob("reinhard-*.npy"))
    assert len(copies) == 1
    stored = np.load(copies[0], mmap_mode="r")
    patchset = PatchSet.open(patches)
    assert not np.array_equal(stored, patchset.pixels)
    # The channel statistics describe what the model sees: the normalised pixels.
    stats = channel_stats(stored, patchset.rows("train"))
    assert saved["mean"] == pytest.approx(list(stats.mean))
    assert saved["std"] == pytest.approx(list(stats.std))
    # evaluate normalises per batch; the numbers equal those of the stored copy.
    recorded = json.loads((run / "metrics.json").read_text())
    _, metrics = evaluate_run(run, device="cpu", bootstrap=0)
    for split in ("val", "test"):
        assert metrics[split]["loss"] == pytest.approx(recorded[split]["loss"], rel=1e-6)
    val = pd.read_parquet(run / "evaluation" / "patches" / "predictions" / "val.parquet")
    original = pd.read_parquet(run / "predictions" / "val.parquet")
    np.testing.assert_allclose(val["score"], original["score"], rtol=1e-5)
    # A second run with the same target reuses the copy instead of writing another.
    modified = copies[0].stat().st_mtime_ns
    train(_config(patches, tmp_path / "run2", stain_normalization="reinhard", seed=1),
          progress=False)  # fmt: skip
    assert copies[0].stat().st_mtime_ns == modified


def test_per_batch_stain_step_equals_the_stored_copy(patches: Path, tmp_path: Path) -> None:
    data = load_run_data(
        patches, device=torch.device("cpu"), splits=("val",), attributes=["tissue_ratio"],
        stain_normalization="macenko",
    )  # fmt: skip
    assert data.stained_pixels is not None
    per_batch = load_run_data(
        patches, device=torch.device("cpu"), splits=("val",), scheme=data.scheme,
        normalization=data.normalization, robust_bins=data.robust_bins,
    )  # fmt: skip
    assert per_batch.stained_pixels is None
    index = np.arange(len(per_batch.splits["val"]))
    stored = data.loaders["val"].load(index).x
    torch.testing.assert_close(per_batch.loaders["val"].load(index).x, stored)


# --------------------------------------------------------------------- one class only


def test_one_class_warning_names_the_cause_and_the_options() -> None:
    names = ("non-tumor", "tumor")
    labels = np.array([0] * 9 + [1])
    text = one_class_warning(labels, np.full(10, 0.2), names)
    assert text is not None
    assert "predicts non-tumor for every patch (10.0% of them are tumor)" in text
    assert "cb_erm" in text
    assert one_class_warning(labels, np.linspace(0, 1, 10), names) is None
    assert one_class_warning(np.zeros(10, int), np.full(10, 0.2), names) is None


def test_cli_stain_options_reach_the_run(patches: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["train", str(patches), "--out", str(tmp_path / "run"), "--epochs", "1", "--quiet",
         "--hed-jitter", "0.05", "--stain-normalization", "reinhard", "--batch-size", "32"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["hed_jitter"] == 0.05
    assert saved["stain_normalization"] == "reinhard"
    assert saved["normalization"]["stain"]["method"] == "reinhard"
    bad = CliRunner().invoke(
        app, ["train", str(patches), "--out", str(tmp_path / "r2"), "--hed-jitter", "1.5"]
    )
    assert bad.exit_code == 2 and "hed_jitter" in bad.output
