"""MeDi generator end to end: learning, resume, the augmented patch set, training on it, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from unshortcut.cli import app
from unshortcut.errors import UnshortcutError
from unshortcut.generate import (
    GeneratorConfig,
    augment_patch_set,
    load_generator,
    train_generator,
)
from unshortcut.tiling.patchset import PatchSet, write_patch_set

pytestmark = pytest.mark.slow

TINY: dict[str, Any] = {
    "widths": [16, 32],
    "attention": [False, False],
    "head_channels": 16,
    "batch_size": 16,
    "epochs": 2,
    "sample_steps": 4,
    "quality_epochs": 1,
    "num_threads": 1,
    "device": "cpu",
}


def write_generator_toy(
    path: Path,
    *,
    n: int = 160,
    size: int = 16,
    channels: int = 3,
    dtype: type = np.uint8,
    seed: int = 0,
) -> Path:
    """Patches whose left ``tissue_ratio`` share is tissue; tumor adds a bright square.

    Site 'b' tissue is brighter. Training has no tumor patch with much tissue at site
    'b' (an absent site x label combination); splits 60/20/20 over 8 images.
    """
    rng = np.random.default_rng(seed)
    label = (np.arange(n) % 2).astype(np.int64)
    split = np.array((["train"] * 6 + ["val"] * 2 + ["test"] * 2) * (n // 10))
    tissue = np.where(rng.random(n) < 0.8, label == 1, label == 0)
    tissue = np.where(tissue, rng.uniform(0.55, 1.0, n), rng.uniform(0.1, 0.45, n))
    site = np.where(rng.random(n) < 0.5, "a", "b")
    site[(split == "train") & (label == 1) & (tissue >= 0.5)] = "a"
    pixels = np.full((n, channels, size, size), 10.0)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        pixels[i, :, :, : round(tissue[i] * size)] = 100 + 30 * (site[i] == "b")
        if label[i]:
            masks[i, 4:12, 4:12] = 255
            pixels[i, 0][masks[i] > 0] = 220
    pixels += rng.normal(0, 3, pixels.shape)
    pixels = np.clip(pixels, 0, 255) * (257 if dtype == np.uint16 else 1)
    table = pd.DataFrame(
        {
            "patch_id": [f"p{i}" for i in range(n)],
            "image_id": [f"img{i % 8}" for i in range(n)],
            "patient_id": [f"pat{i % 8}" for i in range(n)],
            "split": split,
            "x": np.arange(n) * size,
            "y": np.zeros(n, np.int64),
            "size": np.full(n, size),
            "level": np.zeros(n, np.int64),
            "tumor_fraction": masks.reshape(n, -1).mean(axis=1) / 255,
            "tissue_ratio": tissue,
            "label": label,
            "synthetic": np.zeros(n, bool),
            "site": site,
        }
    )
    write_patch_set(path, table, np.rint(pixels).astype(dtype), masks, {"generator": "test"})
    return path


def _config(patches: Path, out: Path, **changes: Any) -> GeneratorConfig:
    return GeneratorConfig(patches=patches, out=out, **(TINY | changes))


def _history(run: Path) -> list[dict[str, Any]]:
    lines = (run / "history.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_generator_toy(tmp_path_factory.mktemp("toy") / "patches")


@pytest.fixture(scope="module")
def generator_run(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_generator(_config(toy, tmp_path_factory.mktemp("gen") / "run", epochs=3))


@pytest.fixture(scope="module")
def augmented(generator_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("aug") / "patches"
    augment_patch_set(
        generator_run,
        out,
        policy="largest",
        attributes=["tissue_ratio", "site:cat"],
        patches_per_image=8,
        device="cpu",
    )
    return out


def test_a_tiny_model_overfits_a_tiny_set(tmp_path: Path) -> None:
    """Two kinds of patch, one per label: the generator must give each label its own kind."""
    n, size = 160, 8
    label = np.arange(n) % 2
    pixels = np.where(label == 1, 200, 40).astype(np.uint8)[:, None, None, None]
    pixels = np.broadcast_to(pixels, (n, 1, size, size)).copy()
    pixels[label == 1, 0, :4] = 120  # tumor patches: a darker top half
    table = pd.DataFrame(
        {
            "patch_id": [f"p{i}" for i in range(n)], "image_id": "img", "patient_id": "pat",
            "split": "train", "x": 0, "y": 0, "size": size, "level": 0,
            "tumor_fraction": label * 1.0, "tissue_ratio": np.linspace(0.2, 0.9, n),
            "label": label, "synthetic": False,
        }
    )  # fmt: skip
    masks = np.where(label == 1, 255, 0).astype(np.uint8)[:, None, None] * np.ones((size, size))
    patches = tmp_path / "patches"
    write_patch_set(patches, table, pixels, masks.astype(np.uint8), {"generator": "test"})
    config = _config(
        patches, tmp_path / "run", widths=[16, 16], head_channels=16, epochs=60, lr=3e-3,
        warmup_steps=20, ema_decay=0.9, cond_dropout=0.0, cond_dropout_each=0.0, augment=False,
        conditions=["tissue_ratio"], with_mask=False,
    )  # fmt: skip
    run = train_generator(config)
    history = _history(run)
    assert history[-1]["loss"] < 0.1 * history[0]["loss"]
    generator = load_generator(run, "cpu")
    wanted = table.iloc[[0, 1, 2, 3]]
    scaled = generator.sample(
        generator.encoder.encode(wanted), seed=0, steps=20, guidance_scale=1.0
    )
    images = generator.scaling.inverse(scaled[:, :1])[:, 0].astype(float)
    for k, lab in enumerate(wanted["label"]):
        top, bottom = images[k, :4].mean(), images[k, 4:].mean()
        if lab == 1:
            assert abs(top - 120) < 25 and abs(bottom - 200) < 25, (top, bottom)
        else:
            assert abs(top - 40) < 25 and abs(bottom - 40) < 25, (top, bottom)


def test_a_killed_generator_run_resumes_exactly(
    toy: Path, generator_run: Path, tmp_path: Path
) -> None:
    config = _config(toy, tmp_path / "run", epochs=3)

    def kill(line: dict[str, Any]) -> None:
        if line["epoch"] == 1:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        train_generator(config, on_epoch_end=kill)
    assert len(_history(config.out)) == 2
    assert not (config.out / "generator.pt").exists()
    with pytest.raises(UnshortcutError, match="training is unfinished"):
        load_generator(config.out)
    with pytest.raises(UnshortcutError, match="already holds files"):
        train_generator(config)
    with pytest.raises(UnshortcutError, match=r"differ.*\(lr\)"):
        train_generator(config.model_copy(update={"lr": 0.5}), resume=True)
    train_generator(config, resume=True)
    assert _history(config.out) == _history(generator_run)
    resumed = torch.load(config.out / "generator.pt", weights_only=False)["model"]
    whole = torch.load(generator_run / "generator.pt", weights_only=False)["model"]
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_the_augmented_set_keeps_real_rows_and_adds_training_rows_only(
    toy: Path, augmented: Path
) -> None:
    source, new = PatchSet.open(toy), PatchSet.open(augmented)
    n = len(source)
    pd.testing.assert_frame_equal(new.table.iloc[:n], source.table, check_exact=True)
    assert np.array_equal(new.pixels[:n], source.pixels)
    assert np.array_equal(new.masks[:n], source.masks)
    generated = new.table.iloc[n:]
    assert len(generated) > 0
    assert (generated["split"] == "train").all() and generated["synthetic"].all()
    for split in ("val", "test"):
        assert np.array_equal(new.rows(split), source.rows(split))
    assert new.pixels.dtype == np.uint8 and new.table.dtypes.equals(source.table.dtypes)
    assert generated["patch_id"].is_unique and not set(generated["patch_id"]) & set(
        source.table["patch_id"]
    )
    assert (generated[["x", "y", "size", "level"]] == -1).all().all()
    # Balanced to the largest group, the absent combination included.
    train = new.table[new.table["split"] == "train"]
    key = [train["label"], train["tissue_ratio"] >= 0.5, train["site"]]
    sizes = train.groupby(key).size()
    assert len(sizes) == 8 and sizes.nunique() == 1
    absent = generated[(generated["label"] == 1) & (generated["tissue_ratio"] >= 0.5)
                       & (generated["site"] == "b")]  # fmt: skip
    assert len(absent) == sizes.iloc[0]
    # Tumor fractions and masks agree with the labels.
    masks = new.masks[n:]
    normal = generated["label"].to_numpy() == 0
    assert (generated["tumor_fraction"].to_numpy()[normal] == 0).all() and masks[normal].max() == 0
    assert (generated["tumor_fraction"].to_numpy()[~normal] > 0).all()
    # Its manifest records the new files' checksums, not the source's.
    assert new.verify() == []
    assert new.manifest["checksums"]["pixels.npy"] != source.manifest["checksums"]["pixels.npy"]


def test_the_quality_report_covers_every_generated_group(augmented: Path) -> None:
    manifest = PatchSet.open(augmented).manifest
    generation = manifest["generations"][-1]
    assert generation["donor_rules"]["tumor|tissue_ratio>=0.5&site=b"] == "label and numeric bins"
    report = json.loads((augmented / generation["quality"]).read_text())
    assert set(report["groups"]) == set(generation["counts"])
    assert report["judge"]["heads"] == ["label", "tissue_ratio", "site"]
    for name, group in report["groups"].items():
        assert group["n_generated"] == generation["counts"][name]
        for value in group["conditional_accuracy"].values():
            assert 0 <= value <= 1
        assert group["nearest_train_distance"]["generated"]["median"] > 0
        assert (augmented / group["grid"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["overall"]["real_val_accuracy"]["n"] == 32


def test_unshortcut_train_runs_on_the_augmented_set_and_never_sees_generated_rows_in_eval(
    augmented: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    args = ["train", str(augmented), "--out", str(run), "--epochs", "1", "--batch-size", "32",
            "--device", "cpu", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    synthetic = set(PatchSet.open(augmented).table.query("synthetic")["patch_id"])
    for split in ("val", "test"):
        predicted = set(pd.read_parquet(run / "predictions" / f"{split}.parquet")["patch_id"])
        assert predicted and not predicted & synthetic


@pytest.mark.parametrize(("channels", "dtype"), [(2, np.uint16), (1, np.float32)])
def test_any_channel_count_and_pixel_type(channels: int, dtype: type, tmp_path: Path) -> None:
    patches = write_generator_toy(tmp_path / "p", n=60, channels=channels, dtype=dtype)
    run = train_generator(_config(patches, tmp_path / "g", epochs=1, with_mask=False))
    new = augment_patch_set(run, tmp_path / "a", count=3, device="cpu").patchset
    source = PatchSet.open(patches)
    added = new.pixels[len(source) :]
    assert added.shape == (12, channels, 16, 16) and added.dtype == dtype
    # Denormalised into the training split's per-channel percentile range.
    scaling = load_generator(run, "cpu").scaling
    per_channel = added.astype(np.float64).transpose(1, 0, 2, 3).reshape(channels, -1)
    assert (per_channel.min(axis=1) >= np.floor(scaling.low)).all()
    assert (per_channel.max(axis=1) <= np.ceil(scaling.high)).all()
    assert (per_channel.max(axis=1) - per_channel.min(axis=1) > 0).all()
    # Without generated masks, each mask is uniform at its row's tumor fraction.
    fraction = new.table["tumor_fraction"].to_numpy()[len(source) :]
    levels = new.masks[len(source) :].reshape(12, -1)
    assert (levels == levels[:, :1]).all()
    np.testing.assert_array_equal(levels[:, 0], np.rint(255 * fraction))


def test_cli_trains_samples_and_reports_mistakes_in_one_line(toy: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    config = tmp_path / "gen.toml"
    config.write_text(
        "widths = [16, 32]\nattention = [false, false]\nhead_channels = 16\nbatch_size = 16\n"
        "sample_steps = 2\nquality_epochs = 1\nnum_threads = 1\n"
    )
    run = tmp_path / "run"
    args = ["generate", "train", str(toy), "--out", str(run), "--epochs", "1", "--config",
            str(config), "--device", "cpu", "--quiet"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "already holds files" in result.output
    out = tmp_path / "new"
    sample = ["generate", "sample", str(run), "--out", str(out), "--device", "cpu", "--quiet"]
    result = runner.invoke(app, [*sample, "--groups", "tumor|tissue_ratio<0.5", "--count", "5"])
    assert result.exit_code == 0, result.output
    table = PatchSet.open(out).table
    assert table["synthetic"].sum() == 5 and "quality.json" in result.output
    for extra, message in (
        (["--groups", "tumor", "--count", "3"], "unknown group"),
        (["--count", "3", "--balance", "largest"], "exactly one of --count and --balance"),
        (["--balance", "ratio:3"], "--balance 'ratio:3'"),
        (["--count", "3", "--attribute", "tumor_fraction:0.1"], "not conditioned on"),
    ):
        result = runner.invoke(app, [*sample, "--overwrite", *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["generate", "sample", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 2 and "not a generator run" in result.output
