"""Nothing lost, nothing silent: each failure a new user met, reproduced, then fixed.

Read-only folders, a full disk, damaged files, hostile options, stray temporaries,
`--overwrite`, `--resume`, non-finite pixels, shared patients, collapsed models.
"""

from __future__ import annotations

import errno
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from reliability_helpers import assert_one_line_error, copy_folder, flip_bytes, read_only
from test_data import write_toy_patch_set
from test_generate_e2e import TINY, write_generator_toy
from unshortcut.atomic import (
    HOST_TAG,
    LeftoverWarning,
    atomic_directory,
    clean_leftovers,
    leftovers,
)
from unshortcut.cli import app
from unshortcut.config import TrainConfig
from unshortcut.errors import UnshortcutError
from unshortcut.generate import GeneratorConfig, train_generator
from unshortcut.generate import training as generator_training
from unshortcut.io.metadata import read_metadata
from unshortcut.metrics import one_class_warnings
from unshortcut.predict import maps
from unshortcut.runs import (
    load_checkpoint,
    open_run,
    partial_run,
    save_checkpoint,
    verify_run,
)
from unshortcut.sealed import seal
from unshortcut.sweep.store import execute
from unshortcut.synth import generate_dataset, make_config
from unshortcut.tiling import patchset as patchset_module
from unshortcut.tiling.patchify import PatchifyConfig, partial_folder, patchify
from unshortcut.tiling.patchset import PatchSet, replace_table, write_patch_set
from unshortcut.train import train

FAST = {
    "epochs": 2,
    "batch_size": 32,
    "bootstrap": 0,
    "lr": 0.02,
    "device": "cpu",
    "num_threads": 1,
}
PATCHIFY = ["--patch-size", "64", "--input-size", "16"]


def cli(*args: Any) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def config(patches: Path, out: Path, **changes: Any) -> TrainConfig:
    return TrainConfig(patches=patches, out=out, **(FAST | changes))


@pytest.fixture(scope="module")
def patches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_patch_set(tmp_path_factory.mktemp("toy") / "patches", n=240)


@pytest.fixture(scope="module")
def finished_run(patches: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(config(patches, tmp_path_factory.mktemp("run") / "run"), progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("synth") / "data"
    generate_dataset(make_config(images=4, size=256, seed=5), folder)
    return folder


@pytest.fixture(scope="module")
def generator_patches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_generator_toy(tmp_path_factory.mktemp("gen-toy") / "patches")


@pytest.fixture(scope="module")
def generator_run(generator_patches: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "run"
    return train_generator(GeneratorConfig(patches=generator_patches, out=out, **TINY))


@pytest.fixture(scope="module")
def predict_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run on patchify's cut of synthetic images (predict cuts images as its patch set
    was); the images are in ``RUN/../data/images``."""
    root = tmp_path_factory.mktemp("predict")
    generate_dataset(make_config(images=6, size=256, seed=2), root / "data")
    patchify(root / "data", root / "patches", PatchifyConfig(patch_size=32, input_size=8))
    return train(config(root / "patches", root / "run", epochs=1), progress=False)


GENERATOR_TOML = (
    "widths = [16, 32]\nattention = [false, false]\nhead_channels = 16\nbatch_size = 16\n"
    'sample_steps = 2\nquality_epochs = 1\nnum_threads = 1\ndevice = "cpu"\n'
)


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# ----------------------------------------------------------------- 1. one-line errors


def test_read_only_output_folder_is_one_line_for_every_command(
    data: Path, patches: Path, finished_run: Path, tmp_path: Path
) -> None:
    locked = tmp_path / "locked"
    with read_only(locked):
        for args in (
            ["patchify", data, locked / "p", *PATCHIFY],
            ["train", patches, "--out", locked / "run", "--epochs", "1", "--device", "cpu"],
            ["audit", patches, "--out", locked / "audit", "--bootstrap", "0"],
        ):
            line = assert_one_line_error(cli(*args), str(locked))
            assert "not permitted" in line or "denied" in line or "read-only" in line, line
            assert "choose a folder you can write to" in line
        assert list(locked.iterdir()) == []
    run = copy_folder(finished_run, tmp_path / "run")
    with read_only(run):
        line = assert_one_line_error(cli("evaluate", run, "--bootstrap", "0"), "evaluation")
        assert "choose a folder you can write to" in line


def test_read_only_output_folder_is_one_line_for_the_newer_commands(
    patches: Path,
    finished_run: Path,
    generator_patches: Path,
    generator_run: Path,
    predict_run: Path,
    tmp_path: Path,
) -> None:
    """report, sweep, predict, generate train and sample: one line, nothing written."""
    locked = tmp_path / "locked"
    gen_toml = tmp_path / "gen.toml"
    gen_toml.write_text(GENERATOR_TOML)
    sweep_toml = tmp_path / "sweep.toml"
    sweep_toml.write_text(
        f'name = "ro"\nout = "{locked / "sweep"}"\nmethods = ["erm"]\nseeds = 1\n'
        f'[datasets]\ntoy = "{patches}"\n[train]\nepochs = 1\nbootstrap = 0\n'
        'device = "cpu"\nnum_threads = 1\n'
    )
    image = sorted((predict_run.parent / "data" / "images").iterdir())[0]
    with read_only(locked):
        for args in (
            ["report", finished_run, "--out", locked / "report.html"],
            ["sweep", sweep_toml],
            ["predict", predict_run, image, "--out", locked / "pred", "--device", "cpu"],
            ["generate", "train", generator_patches, "--out", locked / "g", "--epochs", "1",
             "--config", gen_toml, "--quiet"],
            ["generate", "sample", generator_run, "--out", locked / "s", "--count", "4",
             "--device", "cpu", "--quiet"],
        ):  # fmt: skip
            line = assert_one_line_error(cli(*args), str(locked))
            assert "not permitted" in line or "denied" in line or "read-only" in line, line
        assert list(locked.iterdir()) == []


def test_disk_full_during_generator_training_is_one_line_and_resumes_exactly(
    generator_patches: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen_toml = tmp_path / "gen.toml"
    gen_toml.write_text(GENERATOR_TOML)

    def command(out: Path) -> list[Any]:
        return ["generate", "train", generator_patches, "--out", out, "--epochs", "3",
                "--config", gen_toml, "--quiet"]  # fmt: skip

    assert cli(*command(tmp_path / "whole")).exit_code == 0
    write = generator_training.atomic_write_bytes
    saved: list[int] = []

    def full_at_second_checkpoint(path: Path, data: bytes) -> None:
        if path.name == "last.pt":
            saved.append(1)
            if len(saved) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write(path, data)

    monkeypatch.setattr(generator_training, "atomic_write_bytes", full_at_second_checkpoint)
    out = tmp_path / "run"
    line = assert_one_line_error(cli(*command(out)), "No space left", "last.pt")
    assert "--resume" in line
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["last.pt"]  # no temporary
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["epoch"] == 0
    monkeypatch.setattr(generator_training, "atomic_write_bytes", write)
    result = cli(*command(out), "--resume")
    assert result.exit_code == 0, result.output
    resumed = torch.load(out / "generator.pt", weights_only=False)["model"]
    whole = torch.load(tmp_path / "whole" / "generator.pt", weights_only=False)["model"]
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_disk_full_during_predict_is_one_line_and_leaves_no_image_folder(
    predict_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = sorted((predict_run.parent / "data" / "images").iterdir())[0]
    save_png = maps.save_png

    def full_at_the_second_picture(path: Path, rgb: np.ndarray) -> None:
        if path.name == "shaky.png":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        save_png(path, rgb)

    monkeypatch.setattr(maps, "save_png", full_at_the_second_picture)
    out = tmp_path / "pred"
    args = ["predict", predict_run, image, "--out", out, "--device", "cpu"]
    assert_one_line_error(cli(*args), "No space left", "shaky.png")
    assert list(out.iterdir()) == []  # neither a half-written folder nor its temporary
    monkeypatch.setattr(maps, "save_png", save_png)
    assert cli(*args).exit_code == 0
    assert sorted(p.name for p in (out / image.stem).iterdir()) == [
        "overlay.png", "predictions.geojson", "predictions.parquet", "shaky.png",
        "tumor.geojson",
    ]  # fmt: skip


def test_disk_full_during_patchify_is_one_line_and_keeps_what_was_tiled(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean = tmp_path / "clean"
    patchify(data, clean, PatchifyConfig(patch_size=64, input_size=16))
    append = patchset_module.NpyAppender.append

    def full_at_third_image(self: Any, rows: np.ndarray) -> None:
        if self.path.parent.name.startswith(".000002.tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        append(self, rows)

    monkeypatch.setattr(patchset_module.NpyAppender, "append", full_at_third_image)
    out = tmp_path / "patches"
    line = assert_one_line_error(cli("patchify", data, out, *PATCHIFY), "No space left")
    assert "free some space" in line and "OUT.partial" in line
    assert not out.exists()
    parts = partial_folder(out) / "parts"
    assert sorted(p.name for p in parts.iterdir()) == ["000000", "000001"]  # no leftovers
    monkeypatch.setattr(patchset_module.NpyAppender, "append", append)
    result = cli("patchify", data, out, *PATCHIFY)
    assert result.exit_code == 0, result.output
    assert "2 of 4 image(s) were already tiled" in result.output
    for name in ("pixels.npy", "masks.npy", "patches.parquet", "manifest.json"):
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name


def test_damaged_table_and_pixel_header_are_one_line(patches: Path, tmp_path: Path) -> None:
    table = copy_folder(patches, tmp_path / "table")
    flip_bytes(table / "patches.parquet", len((table / "patches.parquet").read_bytes()) // 2)
    for args in (["train", table, "--out", tmp_path / "r1"], ["audit", table]):
        assert_one_line_error(cli(*args), "patches.parquet", "damaged")
    footer = copy_folder(patches, tmp_path / "footer")
    flip_bytes(footer / "patches.parquet", -12, 8)
    assert_one_line_error(cli("audit", footer), "patches.parquet")
    header = copy_folder(patches, tmp_path / "header")
    flip_bytes(header / "pixels.npy", 20, 6)  # inside the header's dict text
    assert_one_line_error(cli("train", header, "--out", tmp_path / "r2"), "pixels.npy")
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_evaluate_refuses_negative_bootstrap_and_names_outside_the_run(
    finished_run: Path, tmp_path: Path
) -> None:
    assert_one_line_error(cli("evaluate", finished_run, "--bootstrap", "-5"), "--bootstrap")
    for name in ("../../x", "..", "a/b", ""):
        assert_one_line_error(cli("evaluate", finished_run, "--name", name), "--name")
    assert not (finished_run.parent.parent / "x").exists()
    assert not (finished_run / "evaluation").exists()


# ------------------------------------------------------------- 2. lost or stray data


def test_overwrite_keeps_the_old_run_until_the_new_one_is_finished(
    patches: Path, finished_run: Path, tmp_path: Path
) -> None:
    out = copy_folder(finished_run, tmp_path / "run")
    old_metrics = read(out / "metrics.json")
    new = config(patches, out, method="cb_erm")

    def killed(epoch: int) -> None:
        assert read(out / "metrics.json") == old_metrics  # readers still see the old run
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(new, overwrite=True, progress=False, on_epoch_end=killed)
    assert read(out / "metrics.json") == old_metrics and verify_run(out) == []
    assert (partial_run(out) / "checkpoints" / "last.pt").is_file()
    with pytest.raises(UnshortcutError, match=r"run\.partial: holds an unfinished run"):
        train(new, progress=False)
    train(new, resume=True, progress=False)  # continues the replacement, swaps it in
    assert open_run(out).config.method == "cb_erm" and not partial_run(out).exists()
    reference = train(config(patches, tmp_path / "reference", method="cb_erm"), progress=False)
    assert read(out / "metrics.json") == read(reference / "metrics.json")
    assert leftovers(tmp_path) == [] and verify_run(out) == []
    # Refused input replaces nothing.
    with pytest.raises(UnshortcutError, match="method"):
        train(config(patches, out, method="magic"), overwrite=True, progress=False)
    assert open_run(out).config.method == "cb_erm" and not partial_run(out).exists()


def test_leftovers_of_a_killed_writer_are_removed_and_named(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}@{HOST_TAG}-0a1b"
    (stale / "deep").mkdir(parents=True)
    (stale / "deep" / "pixels.npy").write_bytes(b"x" * 2**20)
    live = tmp_path / f".out.tmp-{dead.pid + 10**7}@{HOST_TAG}-0a1b"  # no such pid: dead too
    alive = tmp_path / f".out.tmp-{subprocess.os.getpid()}@{HOST_TAG}-0a1b"
    alien = tmp_path / f".out.tmp-{dead.pid}@00000000-0a1b"  # another machine's
    for folder in (live, alive, alien):
        folder.mkdir()
    with pytest.warns(LeftoverWarning) as caught, atomic_directory(tmp_path / "out") as target:
        (target / "done").write_text("yes")
    assert {str(w.message) for w in caught} == {
        f"removed {stale} (1.0 MB), left by a killed run",
        f"removed {live} (0.0 MB), left by a killed run",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", alive.name, alien.name])
    # A replaced folder caught between two renames is put back, not removed.
    (tmp_path / "out").rename(tmp_path / f".out.old-{dead.pid}@{HOST_TAG}-0a1b")
    assert clean_leftovers(tmp_path, "out")[0].startswith(f"restored {tmp_path / 'out'}")
    assert read(tmp_path / "out" / "done") == "yes"


def test_patchify_cli_names_the_leftovers_it_removes(data: Path, tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".patches.tmp-{dead.pid}@{HOST_TAG}-beef").mkdir()
    result = cli("patchify", data, tmp_path / "patches", *PATCHIFY)
    assert result.exit_code == 0, result.output
    assert "warning: removed" in result.output and "left by a killed run" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patches"]


# ------------------------------------------------------------- 3. misleading outcomes


def write_float_images(root: Path, nan_in: int | None) -> Path:
    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    for i in range(3):
        image = rng.random((128, 128, 3)).astype(np.float32)
        if i == nan_in:
            image[70, 20, 1] = np.nan
        np.save(root / "images" / f"im{i}.npy", image)
        mask = np.zeros((128, 128), np.uint8)
        mask[30:60, 30:60] = 255
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    return root


def test_nan_pixels_are_refused_by_patchify_naming_the_image(tmp_path: Path) -> None:
    data = write_float_images(tmp_path / "data", nan_in=1)
    out = tmp_path / "patches"
    args = ("patchify", data, out, "--patch-size", "32", "--input-size", "16")
    assert_one_line_error(cli(*args), "im1.npy", "NaN or infinite", "x=0, y=64")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def nan_patch_set(path: Path, patches: Path) -> Path:
    source = PatchSet.open(patches)
    pixels = np.asarray(source.pixels, dtype=np.float32).copy()
    pixels[source.rows("train")[3], 1, 2, 2] = np.inf
    return write_patch_set(path, source.table, pixels, np.asarray(source.masks), {}).path


def test_nan_pixels_in_a_patch_set_are_named_not_blamed_on_the_learning_rate(
    patches: Path, tmp_path: Path
) -> None:
    bad = nan_patch_set(tmp_path / "nan", patches)
    line = assert_one_line_error(cli("train", bad, "--out", tmp_path / "r"), "NaN or infinite")
    assert "pixels.npy" in line and "--lr" not in line
    with pytest.raises(UnshortcutError, match=r"NaN or infinite pixel values.*unshortcut check"):
        train(config(bad, tmp_path / "raw", normalize=False), progress=False)
    result = cli("check", bad)
    assert result.exit_code == 1 and "pixels.npy: patch" in result.output, result.output


def test_a_patient_in_two_splits_of_metadata_is_an_error(tmp_path: Path) -> None:
    csv = tmp_path / "metadata.csv"
    csv.write_text("image_id,patient_id,split\na,p1,train\nb,p1,test\nc,p2,val\n")
    with pytest.raises(
        UnshortcutError,
        match=r"metadata.csv: patient\(s\) in more than one "
        r"split: p1 in train, test\. ",
    ):
        read_metadata(csv, ["a", "b", "c"])
    csv.write_text("image_id,patient_id,split\na,p1,train\nb,p1,train\nc,p2,val\n")
    assert len(read_metadata(csv, ["a", "b", "c"])) == 3


def test_the_odd_pixel_type_is_named_not_its_neighbour(data: Path, tmp_path: Path) -> None:
    odd = copy_folder(data, tmp_path / "data")
    images = sorted((odd / "images").iterdir())
    import tifffile

    pixels = tifffile.imread(images[2])
    tifffile.imwrite(images[2], pixels.astype(np.uint16) * 257)
    line = assert_one_line_error(cli("patchify", odd, tmp_path / "p", *PATCHIFY), images[2].name)
    assert "uint16" in line and images[0].name not in line and images[1].name not in line
    assert "other 3 image(s)" in line


def test_ctrl_c_says_how_to_go_on(patches: Path, tmp_path: Path, monkeypatch: Any) -> None:
    from unshortcut import train as train_module

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    result = cli("train", patches, "--out", tmp_path / "r")
    assert result.exit_code == 130
    assert "interrupted: every finished epoch is kept" in result.output
    assert "unshortcut train --resume --out RUN" in result.output


def test_resume_needs_only_the_run_folder(
    patches: Path, finished_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"

    def killed(epoch: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(patches, out), progress=False, on_epoch_end=killed)
    moved = tmp_path / "elsewhere"
    out.rename(moved)  # a run folder that moved still resumes: --out wins
    result = cli("train", "--resume", "--out", moved, "--quiet")
    assert result.exit_code == 0, result.output
    assert read(moved / "metrics.json") == read(finished_run / "metrics.json")
    assert_one_line_error(cli("train", "--resume", "--out", tmp_path / "none"), "no run")
    assert_one_line_error(cli("train", "--resume", "--out", moved, "--lr", "0.5"), "lr")
    assert_one_line_error(cli("train", "--resume"), "--out RUN")


def lrs(run: Path) -> list[float]:
    return [json.loads(line)["lr"] for line in read(run / "history.jsonl").splitlines()]


def test_more_epochs_extend_a_finished_run_through_a_partial_folder(
    patches: Path, finished_run: Path, tmp_path: Path
) -> None:
    out = copy_folder(finished_run, tmp_path / "run")
    before = read(out / "metrics.json")

    def killed(epoch: int) -> None:
        assert read(out / "metrics.json") == before  # the finished run stays readable
        raise KeyboardInterrupt

    longer = config(patches, out, epochs=4)
    with pytest.raises(KeyboardInterrupt):
        train(longer, resume=True, progress=False, on_epoch_end=killed)
    assert read(out / "metrics.json") == before and verify_run(out) == []
    result = cli("train", "--resume", "--out", out, "--epochs", "4", "--quiet")
    assert result.exit_code == 0, result.output
    assert not partial_run(out).exists() and verify_run(out) == []
    assert json.loads(read(out / "config.json"))["epochs"] == 4
    history = read(out / "history.jsonl").splitlines()
    assert history[:2] == read(finished_run / "history.jsonl").splitlines()
    lr = FAST["lr"]
    # Epochs 2 and 3 follow the cosine over the new total of 4 epochs...
    assert lrs(out) == pytest.approx(
        [lr, 0.5 * lr] + [lr * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in (2, 3)]
    )
    # ...so the run differs from one trained for 4 epochs from the start (epoch 1's rate).
    fresh = train(config(patches, tmp_path / "fresh", epochs=4), progress=False)
    assert lrs(fresh)[1] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi / 4)))
    assert read(fresh / "history.jsonl") != read(out / "history.jsonl")
    # An uninterrupted extension gives the same bytes as the killed-and-resumed one.
    again = copy_folder(finished_run, tmp_path / "again")
    train(config(patches, again, epochs=4), resume=True, progress=False)
    assert read(again / "metrics.json") == read(out / "metrics.json")
    with pytest.raises(UnshortcutError, match="cannot be shortened"):
        train(config(patches, out, epochs=3), resume=True, progress=False)


# ---------------------------------------------------------------- 4. format safety


def test_damaged_or_foreign_checkpoints_are_one_line(finished_run: Path, tmp_path: Path) -> None:
    run = copy_folder(finished_run, tmp_path / "run")
    final = run / "checkpoints" / "final-worst_group_accuracy.pt"
    state = load_checkpoint(final, "cpu")
    state["model"][next(iter(state["model"]))].view(-1)[0] += 1  # a silently wrong weight
    torch.save({**state, "integrity": torch.load(final, weights_only=False)["integrity"]}, final)
    assert_one_line_error(cli("evaluate", run), final.name, "does not match its checksum")
    torch.save({"model": state["model"]}, final)
    assert_one_line_error(cli("evaluate", run), final.name, "not an unshortcut checkpoint")
    final.write_bytes(b"PK\x03\x04 not really a zip")
    assert_one_line_error(cli("evaluate", run), final.name, "damaged")
    save_checkpoint(state, final)
    assert load_checkpoint(final, "cpu")["epoch"] == state["epoch"]


def test_foreign_manifest_and_run_config_are_named(
    patches: Path, finished_run: Path, tmp_path: Path
) -> None:
    newer = copy_folder(patches, tmp_path / "newer")
    manifest = json.loads(read(newer / "manifest.json"))
    (newer / "manifest.json").write_text(json.dumps(seal({**manifest, "format_version": 99})))
    assert_one_line_error(cli("audit", newer), "manifest.json", "format version 99")
    (newer / "manifest.json").write_text(json.dumps(seal({**manifest, "n_patches": "many"})))
    assert_one_line_error(cli("audit", newer), "manifest.json", "damaged manifest")
    (newer / "manifest.json").write_text(json.dumps({**manifest, "n_patches": 241}))
    assert_one_line_error(cli("audit", newer), "manifest.json", "does not match its content")
    run = copy_folder(finished_run, tmp_path / "run")
    saved = json.loads(read(run / "config.json"))
    assert saved["format"] == "unshortcut-run" and saved["format_version"] == 1
    (run / "config.json").write_text(json.dumps(seal({**saved, "format": "someone-else"})))
    assert_one_line_error(cli("evaluate", run), "config.json", "not an unshortcut run")
    (run / "config.json").write_text(json.dumps({**saved, "lr": 0.5}))  # a silent change
    assert_one_line_error(cli("evaluate", run), "config.json", "damaged")


def test_check_reads_everything_and_names_the_damage(
    patches: Path, finished_run: Path, tmp_path: Path
) -> None:
    for folder, kind in ((patches, "patch set"), (finished_run, "run")):
        result = cli("check", folder)
        assert result.exit_code == 0 and f"({kind}) is intact" in result.output, result.output
    damaged = copy_folder(patches, tmp_path / "patches")
    flip_bytes(damaged / "pixels.npy", -1000, 1)  # opening cannot see this; check can
    assert len(PatchSet.open(damaged)) == 240
    result = cli("check", damaged)
    assert result.exit_code == 1 and "pixels.npy: does not match the checksum" in result.output
    run = copy_folder(finished_run, tmp_path / "run")
    flip_bytes(run / "predictions" / "val.parquet", 300, 1)
    result = cli("check", run)
    assert result.exit_code == 1 and "val.parquet: does not match" in result.output
    (run / "metrics.json").unlink()
    result = cli("check", run)
    assert result.exit_code == 1 and "unfinished (no metrics.json)" in result.output
    assert_one_line_error(cli("check", tmp_path), "neither a patch set")


# --------------------------------------------------------------------- 6. guardrails


def test_one_class_warning_counts_what_the_model_misses() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    assert one_class_warnings(labels, np.zeros(100, bool)) == [
        "the model predicts non-tumor for 100.0% of the 100 patches and finds 0% of the 10 "
        "tumor ones: it has collapsed to one class (balanced accuracy near 50). Train with "
        "class-balanced batches (--method cb_erm or resample), check the labels, or lower --lr"
    ]
    two_found = np.zeros(100, bool)
    two_found[[90, 91]] = True  # predicts tumor for 2% of patches and finds 20% of tumor
    assert one_class_warnings(labels, two_found) == []
    assert one_class_warnings(labels[:92], np.zeros(92, bool)) == []  # 2 tumor: too few
    assert "predicts tumor for 99.0%" in one_class_warnings(1 - labels, np.arange(100) > 0)[0]


def test_a_collapsed_model_is_reported_on_the_console(tmp_path: Path) -> None:
    """ERM on tumor-poor data without a visual signal predicts non-tumor for everything."""
    rng = np.random.default_rng(0)
    n = 400
    label = (rng.random(n) < 0.1).astype(np.int64)
    split = np.array(["train"] * 240 + ["val"] * 80 + ["test"] * 80)
    table = pd.DataFrame(
        {
            "patch_id": [f"p{i}" for i in range(n)],
            "image_id": [f"{s}{i % 5}" for i, s in enumerate(split)],
            "patient_id": [f"{s}{i % 5}" for i, s in enumerate(split)],
            "split": split,
            "x": np.arange(n),
            "y": 0,
            "size": 8,
            "level": 0,
            "tumor_fraction": label * 0.5,
            "tissue_ratio": rng.random(n),
            "label": label,
            "synthetic": True,
        }
    )
    pixels = rng.integers(0, 255, (n, 1, 8, 8)).astype(np.uint8)
    masks = np.zeros((n, 8, 8), np.uint8)
    write_patch_set(tmp_path / "poor", table, pixels, masks, {})
    result = cli(
        "train",
        tmp_path / "poor",
        "--out",
        tmp_path / "run",
        "--epochs",
        "3",
        "--device",
        "cpu",
        "--quiet",
        "--select-by",
        "loss",
    )
    assert result.exit_code == 0, result.output
    assert "warning: test: the model predicts non-tumor for 100.0%" in result.output
    assert "--method cb_erm or resample" in result.output
    # The same words after evaluate, in a report, and in a sweep's log.
    for args in (
        ["evaluate", tmp_path / "run", "--bootstrap", "0"],
        ["report", tmp_path / "run", "--bootstrap", "0"],
    ):
        result = cli(*args)
        assert result.exit_code == 0, result.output
        assert "collapsed to one class" in result.output.replace("\n", " "), result.output
    job = config(tmp_path / "poor", tmp_path / "sweep-run", epochs=3, select_by=["loss"])
    status, texts = execute(job.model_dump(mode="json"))
    assert status == "finished"
    assert any(t.startswith("erm: test: the model predicts non-tumor") for t in texts)


def test_an_empty_jtt_error_set_reaches_the_console_as_one_line(
    patches: Path, tmp_path: Path
) -> None:
    # The toy task is learned perfectly in a few epochs: JTT then has nothing to upweight.
    result = cli(
        "train",
        patches,
        "--out",
        tmp_path / "jtt",
        "--method",
        "jtt",
        "--hp",
        "epochs=4",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--lr",
        "0.05",
    )
    assert_one_line_error(result, "error set is empty")


def test_a_group_absent_from_the_test_split_is_named_on_the_console(
    patches: Path, tmp_path: Path
) -> None:
    edited = copy_folder(patches, tmp_path / "patches")
    table = PatchSet.open(edited).table
    gone = (table["split"] == "test") & (table["label"] == 1) & (table["tissue_ratio"] < 0.5)
    table.loc[gone, "split"] = "train"
    replace_table(edited, table)
    result = cli("train", edited, "--out", tmp_path / "run", "--epochs", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "warning: test: group tumor|tissue_ratio<0.5 has no samples" in result.output


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_folder_is_swapped_in_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    from unshortcut import atomic

    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "set"
    for version in ("old", "new"):
        with atomic_directory(target, overwrite=True) as folder:
            (folder / "version").write_text(version)
    assert read(target / "version") == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
