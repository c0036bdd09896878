"""Parallel patchify equals serial patchify byte for byte; a killed patchify resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from unshortcut.cli import app
from unshortcut.synth import generate_dataset, make_config
from unshortcut.tiling.patchify import PatchifyConfig, partial_folder, patchify

FILES = ("pixels.npy", "masks.npy", "patches.parquet", "manifest.json")
CONFIG = PatchifyConfig(patch_size=64, input_size=16)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("synth") / "data"
    generate_dataset(make_config(images=5, size=384, seed=3), folder)
    return folder


@pytest.fixture(scope="module")
def serial(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serial") / "patches"
    patchify(data, out, CONFIG)
    return out


def _same_files(a: Path, b: Path) -> None:
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow
def test_parallel_patchify_equals_serial_byte_for_byte(
    data: Path, serial: Path, tmp_path: Path
) -> None:
    seen: list[tuple[str, int, int]] = []

    def on_image(image_id: str, done: int, total: int, bands: int):
        seen.append((image_id, done, total))
        return lambda: None

    out = tmp_path / "patches"
    patchify(data, out, CONFIG, on_image=on_image, workers=2)
    _same_files(serial, out)
    assert sorted(d for _, d, _ in seen) == [1, 2, 3, 4, 5]  # one call per finished image
    assert not partial_folder(out).exists()
    result = CliRunner().invoke(
        app,
        ["patchify", str(data), str(tmp_path / "cli"), "--patch-size", "64", "--input-size",
         "16", "--workers", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    _same_files(serial, tmp_path / "cli")


def test_killed_patchify_resumes_image_by_image(data: Path, serial: Path, tmp_path: Path) -> None:
    out = tmp_path / "patches"
    tiled: list[str] = []

    def killed_at_third(image_id: str, done: int, total: int, bands: int):
        if done == 3:
            raise KeyboardInterrupt
        tiled.append(image_id)
        return lambda: None

    with pytest.raises(KeyboardInterrupt):
        patchify(data, out, CONFIG, on_image=killed_at_third)
    assert not out.exists()
    parts = sorted(p.name for p in (partial_folder(out) / "parts").iterdir())
    assert parts == ["000000", "000001", "000002"]
    again: list[str] = []

    def record(image_id: str, done: int, total: int, bands: int):
        again.append(image_id)
        return lambda: None

    result = patchify(data, out, CONFIG, on_image=record)
    assert len(again) == 2 and not set(again) & set(tiled)  # only the missing images
    assert result.warnings[0] == (
        f"resumed an interrupted patchify: 3 of 5 image(s) were already tiled in "
        f"{partial_folder(out)}"
    )
    _same_files(serial, out)
    assert not partial_folder(out).exists()


def test_partial_parts_of_other_settings_are_discarded(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "patches"

    def kill(image_id: str, done: int, total: int, bands: int):
        if done == 1:
            raise KeyboardInterrupt
        return lambda: None

    with pytest.raises(KeyboardInterrupt):
        patchify(data, out, CONFIG, on_image=kill)
    other = PatchifyConfig(patch_size=64, input_size=8)
    result = patchify(data, out, other)
    assert result.warnings[0].endswith("held an interrupted patchify of other inputs or settings; "
                                       "discarded and started afresh")  # fmt: skip
    assert result.manifest["parameters"]["input_size"] == 8
