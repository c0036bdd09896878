"""`unshortcut patchify` end to end: a hand-computed case, real data, bad input, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from unshortcut.cli import app
from unshortcut.tiling import patchify as patchify_module
from unshortcut.tiling.patchify import PatchifyConfig, patchify
from unshortcut.tiling.patchset import PatchSet
from unshortcut.tiling.splits import unit_keys

runner = CliRunner()


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def hand_case(root: Path) -> Path:
    """8x8 RGB image, 4x4 patches. Tumor: 1 px top-left, a 2x4 strip top-right, the
    whole bottom-right patch. Tissue: all of the top row of patches, 4 px of the
    bottom-left patch, nothing in the bottom-right patch (glass, dropped by default)."""
    image = np.arange(64 * 3, dtype=np.uint8).reshape(8, 8, 3)
    tumor = np.zeros((8, 8), np.uint8)
    tumor[0, 0] = 255
    tumor[2:4, 4:8] = 255
    tumor[4:8, 4:8] = 255
    tissue = np.zeros((8, 8), np.uint8)
    tissue[0:4, :] = 255
    tissue[4:6, 0:2] = 255
    save(root / "images" / "a.png", image)
    save(root / "masks" / "a.png", tumor)
    save(root / "tissue" / "a.png", tissue)
    return root


def invoke(*args: str):
    return runner.invoke(app, ["patchify", *args])


def test_hand_computed_case(tmp_path: Path) -> None:
    data = hand_case(tmp_path / "data")
    result = invoke(str(data), str(tmp_path / "out"), "--patch-size", "4", "--input-size", "2")
    assert result.exit_code == 0, result.output
    patches = PatchSet.open(tmp_path / "out")
    table = patches.table
    # Bottom-right patch has no tissue: dropped by the default --min-tissue 0.05.
    assert table["patch_id"].tolist() == ["a@0,0", "a@4,0", "a@0,4"]
    assert table["x"].tolist() == [0, 4, 0] and table["y"].tolist() == [0, 0, 4]
    assert table["size"].tolist() == [4, 4, 4] and table["level"].tolist() == [0, 0, 0]
    np.testing.assert_allclose(table["tumor_fraction"], [1 / 16, 8 / 16, 0])
    np.testing.assert_allclose(table["tissue_ratio"], [1, 1, 4 / 16])
    assert table["label"].tolist() == [1, 1, 0]
    assert not table["synthetic"].any()
    assert table["patient_id"].tolist() == ["a", "a", "a"]
    assert patches.pixels.shape == (3, 3, 2, 2) and patches.pixels.dtype == np.uint8
    image = np.asarray(Image.open(data / "images" / "a.png")).astype(float)
    block = image[0:4, 4:8].reshape(2, 2, 2, 2, 3).mean(axis=(1, 3))
    np.testing.assert_array_equal(patches.pixels[1], np.floor(block + 0.5).transpose(2, 0, 1))
    assert patches.masks[0].tolist() == [[64, 0], [0, 0]]
    assert patches.masks[1].tolist() == [[0, 0], [255, 255]]
    manifest = patches.manifest
    assert manifest["parameters"]["patch_size"] == 4 and manifest["parameters"]["stride"] == 4
    assert manifest["images"]["a"]["grid_patches"] == 4 and manifest["images"]["a"]["kept"] == 3
    assert manifest["channels"] == 3 and manifest["dtype"] == "uint8"
    # With a tumor threshold and no tissue filter, all four patches and the new rule.
    result = invoke(str(data), str(tmp_path / "out2"), "--patch-size", "4", "--input-size", "2",
                    "--min-tissue", "0", "--min-tumor-fraction", "0.5")  # fmt: skip
    assert result.exit_code == 0, result.output
    table = PatchSet.open(tmp_path / "out2").table
    assert table["label"].tolist() == [0, 1, 0, 1]
    np.testing.assert_allclose(table["tissue_ratio"], [1, 1, 4 / 16, 0])


def patient_case(root: Path, n_images: int = 9) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n_images):
        save(root / "images" / f"img{i}.png", rng.integers(0, 200, (16, 16, 3), dtype=np.uint8))
        save(root / "masks" / f"img{i}.png", (rng.random((16, 16)) < 0.05).astype(np.uint8) * 255)
    meta = pd.DataFrame(
        {
            "image_id": [f"img{i}" for i in range(n_images)],
            "patient_id": [f"p{i // 3}" for i in range(n_images)],
            "site": [f"site{i % 2}" for i in range(n_images)],
            "age": np.arange(n_images) + 40,
        }
    )
    meta.to_csv(root / "metadata.csv", index=False)
    return root


def test_metadata_columns_and_patient_splits(tmp_path: Path) -> None:
    data = patient_case(tmp_path / "data")
    out = tmp_path / "out"
    result = patchify(data, out, PatchifyConfig(patch_size=8, input_size=4, min_tissue=0))
    table = PatchSet.open(out).table
    assert len(table) == 9 * 4
    assert {"site", "age"} <= set(table.columns)
    assert table.loc[table["image_id"] == "img4", "age"].unique().tolist() == [44]
    assert table.groupby("patient_id")["split"].nunique().max() == 1
    assert sorted(table["split"].unique()) == ["test", "train", "val"]
    assert result.manifest["metadata_columns"] == ["patient_id", "site", "age"]
    counts = result.manifest["counts"]
    assert sum(c["patches"] for c in counts.values()) == len(table)
    # A split column in metadata.csv wins over drawn splits.
    meta = pd.read_csv(data / "metadata.csv")
    meta["split"] = ["train"] * 3 + ["val"] * 3 + ["test"] * 3
    meta.to_csv(data / "metadata.csv", index=False)
    patchify(data, out, PatchifyConfig(patch_size=8, input_size=4, min_tissue=0), overwrite=True)
    table = PatchSet.open(out).table
    assert table.groupby("patient_id")["split"].first().to_dict() == {
        "p0": "train",
        "p1": "val",
        "p2": "test",
    }


def test_failure_leaves_no_patch_set_only_the_visible_partial_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = hand_case(tmp_path / "data")
    out = tmp_path / "out"

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(patchify_module, "write_manifest", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        patchify(data, out, PatchifyConfig(patch_size=4, input_size=2))
    # No patch set and no hidden leftovers; the tiled images wait in OUT.partial.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out.partial"]
    assert [p.name for p in (tmp_path / "out.partial" / "parts").iterdir()] == ["000000"]
    monkeypatch.undo()
    resumed = patchify(data, out, PatchifyConfig(patch_size=4, input_size=2))
    assert resumed.warnings[0].startswith("resumed an interrupted patchify: 1 of 1 image(s)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]
    # A failed --overwrite run keeps the previous, complete patch set.
    monkeypatch.setattr(patchify_module, "write_manifest", crash)
    with pytest.raises(RuntimeError):
        patchify(data, out, PatchifyConfig(patch_size=4, input_size=2, min_tissue=0), True)
    assert len(PatchSet.open(out)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out", "out.partial"]


def break_truncated(data: Path) -> str:
    path = data / "images" / "a.png"
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    return "a.png"


def break_mask_size(data: Path) -> str:
    save(data / "masks" / "a.png", np.zeros((6, 8), np.uint8))
    return "a.png"


def break_missing_mask(data: Path) -> str:
    (data / "masks" / "a.png").unlink()
    return "no mask"


def break_empty(data: Path) -> str:
    for path in (data / "images").iterdir():
        path.unlink()
    return "no images"


def break_non_image(data: Path) -> str:
    (data / "images" / "notes.txt").write_text("hello")
    return "notes.txt"


def break_metadata(data: Path) -> str:
    (data / "metadata.csv").write_bytes(b"patient\x00\xff\xfe,,\n\x00")
    return "metadata.csv"


def break_unknown_image(data: Path) -> str:
    (data / "metadata.csv").write_text("image_id,site\na,x\nghost,y\n")
    return "ghost"


def break_reserved_column(data: Path) -> str:
    (data / "metadata.csv").write_text("image_id,label\na,1\n")
    return "label"


def break_patch_size(data: Path) -> str:
    return "larger than the image"


@pytest.mark.parametrize(
    "breaker",
    [
        break_truncated,
        break_mask_size,
        break_missing_mask,
        break_empty,
        break_non_image,
        break_metadata,
        break_unknown_image,
        break_reserved_column,
        break_patch_size,
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path: Path, breaker) -> None:
    data = hand_case(tmp_path / "data")
    expected = breaker(data)
    size = "16" if breaker is break_patch_size else "4"
    out = tmp_path / "out"
    result = invoke(str(data), str(out), "--patch-size", size, "--input-size", "2")
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and expected in result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_bad_options(tmp_path: Path) -> None:
    data = hand_case(tmp_path / "data")
    for option, value in [
        ("--split-fractions", "0.5,0.5"),
        ("--split-unit", "slide"),
        ("--tissue-method", "magic"),
        ("--input-size", "8"),
    ]:
        out = str(tmp_path / "out")
        result = invoke(str(data), out, "--patch-size", "4", "--input-size", "2", option, value)
        assert result.exit_code == 2 and option in result.output, result.output
        assert not (tmp_path / "out").exists()


def test_help_explains_options() -> None:
    result = runner.invoke(app, ["patchify", "--help"])
    assert result.exit_code == 0
    for option in ("--patch-size", "--min-tissue", "--split-unit", "--region-size", "--seed"):
        assert option in result.output


def test_bcss_tissue_ratio_near_one(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "bcss"
    result = invoke(str(shared_data / "bcss"), str(out), "--patch-size", "256",
                    "--input-size", "16")  # fmt: skip
    assert result.exit_code == 0, result.output
    patches = PatchSet.open(out)
    table = patches.table
    assert set(table["image_id"]) == {"1008", "1015", "1019"}
    assert table["tissue_ratio"].median() > 0.95
    # Three images, three patients: one image per split.
    assert table.groupby("image_id")["split"].nunique().max() == 1
    assert sorted(table["split"].unique()) == ["test", "train", "val"]
    assert 0 < table["label"].mean() < 1
    assert patches.pixels.shape == (len(table), 3, 16, 16)


def test_camelyon16_region_split_shows_the_shortcut(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "c16"
    result = invoke(str(shared_data / "camelyon16"), str(out), "--patch-size", "32",
                    "--input-size", "8", "--split-unit", "region", "--region-size", "256",
                    "--min-tissue", "0", "--min-object-size", "4")  # fmt: skip
    assert result.exit_code == 0, result.output
    table = PatchSet.open(out).table
    assert len(table) == (1500 // 32) * (664 // 32)
    assert table["label"].sum() == 9
    # The tissue-size shortcut: tissue ratio alone ranks tumor patches above the rest.
    auroc = roc_auc_score(table["label"], table["tissue_ratio"])
    assert 0.78 < auroc < 0.92
    units = unit_keys(table, "region", 256)
    assert pd.DataFrame({"u": units, "s": table["split"]}).groupby("u")["s"].nunique().max() == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["split_unit"] == "region"
    assert manifest["parameters"]["region_size"] == 256


def test_pyramid_level_positions_in_full_resolution(tmp_path: Path) -> None:
    import tifffile

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    image[:, 32:] = 240  # glass on the right half
    (tmp_path / "data" / "images").mkdir(parents=True)
    with tifffile.TiffWriter(tmp_path / "data" / "images" / "s.tif") as tif:
        tif.write(image, tile=(16, 16), subifds=1, photometric="rgb")
        tif.write(image[::2, ::2], tile=(16, 16), subfiletype=1, photometric="rgb")
    tumor = np.zeros((64, 64), np.uint8)
    tumor[0:4, 0:16] = 255  # 64 full-resolution pixels in the first patch
    save(tmp_path / "data" / "masks" / "s.png", tumor)
    out = tmp_path / "out"
    config = PatchifyConfig(patch_size=8, input_size=4, level=1, min_tissue=0, min_object_size=1)
    table = patchify(tmp_path / "data", out, config).table
    assert table["size"].unique().tolist() == [16]
    assert table["level"].unique().tolist() == [1]
    assert table["x"].max() == 48 and table["y"].max() == 48 and len(table) == 16
    first = table.iloc[0]
    assert (first["x"], first["y"], first["tumor_fraction"]) == (0, 0, 64 / 256)
    # Tissue came from the pyramid (the left half is tissue, the right half glass).
    left = table[table["x"] < 32]["tissue_ratio"]
    right = table[table["x"] >= 32]["tissue_ratio"]
    assert left.min() > 0.9 and right.max() < 0.1
    assert "pyramid" in PatchSet.open(out).manifest["images"]["s"]["tissue"]
