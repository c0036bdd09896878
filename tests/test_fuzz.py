"""Hostile input, property-based: readers, metadata, config files, damaged patch sets and
run folders, and every command's arguments. Nothing but a clear error (UnshortcutError,
or exit 2 with one ``error:`` line at the CLI), never a traceback.

Example counts come from the hypothesis profile in conftest.py ("ci" by default).
"""

from __future__ import annotations

import json
import math
import tempfile
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import typer.main
from hypothesis import assume, given
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from reliability_helpers import copy_folder
from test_data import write_toy_patch_set
from unshortcut.cli import app
from unshortcut.config import TrainConfig, load_config
from unshortcut.errors import UnshortcutError
from unshortcut.evaluate import evaluate_run
from unshortcut.io.metadata import SPLITS, read_metadata
from unshortcut.io.readers import iter_bands, open_image
from unshortcut.methods import method_names
from unshortcut.runs import load_model, open_run, verify_run
from unshortcut.sweep import load_sweep
from unshortcut.tiling.patchset import PatchSet
from unshortcut.train import train

pytestmark = pytest.mark.fuzz

# ------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def toy(root: Path) -> Path:
    return write_toy_patch_set(root / "toy", n=80, size=8)


@pytest.fixture(scope="module")
def run(root: Path, toy: Path) -> Path:
    config = TrainConfig(
        patches=toy,
        out=root / "run",
        epochs=1,
        batch_size=16,
        bootstrap=0,
        device="cpu",
        num_threads=1,
    )
    return train(config, progress=False)


@pytest.fixture(scope="module")
def data(root: Path) -> Path:
    """Two small images with masks and a metadata.csv: what patchify reads."""
    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (root / "data" / folder).mkdir(parents=True)
    for i in range(2):
        image = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
        image[:, :30] = 250  # glass
        Image.fromarray(image).save(root / "data" / "images" / f"im{i}.png")
        mask = np.zeros((96, 96), np.uint8)
        mask[40:70, 40:70] = 255
        Image.fromarray(mask).save(root / "data" / "masks" / f"im{i}.png")
    (root / "data" / "metadata.csv").write_text("image_id,patient_id,site\nim0,p0,a\nim1,p1,b\n")
    return root / "data"


@pytest.fixture(scope="module")
def sweep_file(root: Path, toy: Path) -> Path:
    file = root / "sweep.toml"
    file.write_text(
        f'name = "f"\nout = "sweep"\nmethods = ["erm"]\nseeds = 1\n[datasets]\n'
        f'toy = "{toy}"\n[search]\ntrials = 1\n[train]\nepochs = 1\n'
    )
    return file


# --------------------------------------------------------------------------- readers


def _image_files(folder: Path) -> dict[str, bytes]:
    """Small valid files of every format the readers decode themselves."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(folder / "a.png")
    Image.fromarray(rgb).save(folder / "a.jpg", quality=80)
    tifffile.imwrite(
        folder / "tiled.tif", rgb, tile=(16, 16), compression="zlib", photometric="rgb"
    )
    tifffile.imwrite(folder / "stripped.tif", rgb.astype(np.uint16), photometric="rgb")
    np.save(folder / "a.npy", rgb.astype(np.float32))
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


with tempfile.TemporaryDirectory() as _folder:
    SEEDS = _image_files(Path(_folder))

Mutation = list[tuple[float, int]]
mutations = st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6
)


def mutate(data: bytes, flips: Mutation, cut: float | None) -> bytes:
    """``data`` with bytes replaced at fractional positions, then maybe truncated."""
    out = bytearray(data)
    for where, value in flips:
        out[int(where * len(out))] = value
    if cut is not None:
        out = out[: int(cut * len(out))]
    return bytes(out)


def read_everything(path: Path) -> None:
    """What patchify does with an image: shape, pixel type, regions, bands."""
    with open_image(path) as reader:
        height, width = reader.level_shape(0)
        assume(height * width * reader.channels <= 2**22)  # a damaged header may claim more
        reader.read_region(0, 0, height, width)
        for _ in iter_bands(reader, 7):
            pass


@given(
    name=st.sampled_from(sorted(SEEDS)),
    flips=mutations,
    cut=st.none() | st.floats(0, 1, exclude_max=True),
)
def test_damaged_images_are_clear_errors(
    tmp_path: Path, name: str, flips: Mutation, cut: float | None
) -> None:
    path = tmp_path / name
    path.write_bytes(mutate(SEEDS[name], flips, cut))
    try:
        read_everything(path)
    except UnshortcutError as error:
        assert str(path) in str(error)


@given(
    ext=st.sampled_from([".png", ".jpg", ".tif", ".npy", ".svs"]),
    magic=st.sampled_from(
        [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"\x93NUMPY"]
    ),
    body=st.binary(max_size=300),
)
def test_random_bytes_under_an_image_name_are_clear_errors(
    tmp_path: Path, ext: str, magic: bytes, body: bytes
) -> None:
    path = tmp_path / f"x{ext}"
    path.write_bytes(magic + body)
    try:
        read_everything(path)
    except UnshortcutError as error:
        assert str(path) in str(error)


# -------------------------------------------------------------------------- metadata

cells = st.sampled_from(
    [
        "im0",
        "im1",
        "im2",
        " im0 ",
        "",
        "p0",
        "p1",
        "train",
        "VAL",
        "test",
        "holdout",
        "0012",
        "1.5",
        "nan",
        '"a,b"',
        "ü",
        "x y",
        "\t",
    ]
)
headers = st.lists(
    st.sampled_from(
        ["image_id", "patient_id", "split", "site", "age", "", " image_id", "label", "image_id"]
    ),
    min_size=1,
    max_size=5,
)


@given(
    header=headers,
    rows=st.lists(st.lists(cells, max_size=6), max_size=5),
    raw=st.none() | st.binary(max_size=80),
)
def test_metadata_is_read_exactly_or_refused(
    tmp_path: Path, header: list[str], rows: list[list[str]], raw: bytes | None
) -> None:
    path = tmp_path / "metadata.csv"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    ids = ["im0", "im1"]
    try:
        table = read_metadata(path, ids)
    except UnshortcutError as error:
        assert str(path) in str(error)
        return
    assert table["image_id"].tolist() == ids
    if "split" in table:
        assert set(table["split"]) <= set(SPLITS)
        if "patient_id" in table:
            assert table.groupby("patient_id")["split"].nunique().max() == 1


# ---------------------------------------------------------------- config and sweep files

values = st.recursive(
    st.none().map(lambda _: "x")
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["", "erm", "gerne", "cpu", "cosine", "tissue_ratio", "..", "/"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "beta"]), inner, max_size=2)
    ),
    max_leaves=6,
)


def toml_value(value: Any) -> str:
    """A TOML literal (inline tables for dicts); floats as TOML spells them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


train_keys = st.sampled_from([*TrainConfig.model_fields, "junk"])
sweep_keys = st.sampled_from(
    [
        "name",
        "out",
        "methods",
        "taus",
        "seeds",
        "datasets",
        "search",
        "train",
        "hparams",
        "ablations",
        "launcher",
        "junk",
    ]
)


@given(table=st.dictionaries(train_keys, values, max_size=6), raw=st.none() | st.text(max_size=60))
def test_config_files_give_a_config_or_a_clear_error(
    tmp_path: Path, table: dict[str, Any], raw: str | None
) -> None:
    file = tmp_path / "train.toml"
    text = raw if raw is not None else "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items())
    file.write_text(text, encoding="utf-8")
    try:
        config = load_config(file, patches=tmp_path, out=tmp_path / "run")
    except UnshortcutError as error:
        assert str(file) in str(error) or "options" in str(error)
        return
    assert isinstance(config, TrainConfig)


@given(
    table=st.dictionaries(sweep_keys, values, max_size=6), raw=st.none() | st.binary(max_size=60)
)
def test_sweep_files_give_a_sweep_or_a_clear_error(
    tmp_path: Path, table: dict[str, Any], raw: bytes | None
) -> None:
    file = tmp_path / "sweep.toml"
    if raw is not None:
        file.write_bytes(raw)
    else:
        file.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in table.items()))
    try:
        load_sweep(file)
    except UnshortcutError as error:
        assert str(file) in str(error)


# ------------------------------------------------------ damaged patch sets and run folders

PATCH_SET_FILES = ("manifest.json", "patches.parquet", "pixels.npy", "masks.npy")
RUN_FILES = (
    "config.json",
    "history.jsonl",
    "metrics.json",
    "checksums.json",
    "checkpoints/last.pt",
    "checkpoints/final-worst_group_accuracy.pt",
    "predictions/val.parquet",
    "predictions/test.parquet",
)


def fresh(tmp_path: Path) -> Path:
    """A new folder per example (hypothesis runs many examples in one test's tmp_path)."""
    return Path(tempfile.mkdtemp(dir=tmp_path))


def damage(file: Path, flips: Mutation, cut: float | None) -> bool:
    """Mutate ``file``; False when the bytes did not change."""
    before = file.read_bytes()
    after = mutate(before, flips, cut)
    file.write_bytes(after)
    return after != before


@given(
    name=st.sampled_from(PATCH_SET_FILES),
    flips=mutations,
    cut=st.none() | st.floats(0, 1, exclude_max=True),
)
def test_any_damage_to_a_patch_set_is_found(
    tmp_path: Path, toy: Path, name: str, flips: Mutation, cut: float | None
) -> None:
    copy = copy_folder(toy, fresh(tmp_path) / "p")
    assume(damage(copy / name, flips, cut))
    try:
        patch_set = PatchSet.open(copy)
        problems = patch_set.verify()
    except UnshortcutError:
        return  # found when opening (cheap checks) or reading the table
    assert problems, f"{name} damaged without notice"


@given(
    name=st.sampled_from(RUN_FILES),
    flips=mutations,
    cut=st.none() | st.floats(0, 1, exclude_max=True),
)
def test_any_damage_to_a_run_is_found_and_never_a_traceback(
    tmp_path: Path, run: Path, name: str, flips: Mutation, cut: float | None
) -> None:
    copy = copy_folder(run, fresh(tmp_path) / "run")
    assume(damage(copy / name, flips, cut))
    try:
        problems = verify_run(copy)
    except UnshortcutError:
        problems = ["found on opening"]
    assert problems, f"{name} damaged without notice"
    try:  # what evaluate and predict do with it: a clear error or a result
        load_model(open_run(copy))
        evaluate_run(copy, bootstrap=0, device="cpu")
    except UnshortcutError:
        pass


# -------------------------------------------------------------------- CLI arguments

INTS = ["-7", "-1", "0", "1", "2", "x", "", "1.5", "1e999"]
FLOATS = ["nan", "inf", "-inf", "-1", "0", "0.5", "1", "2", "1e308", "x", ""]
TEXT = [
    "",
    ".",
    "..",
    "../x",
    "a/b",
    "-",
    "--",
    "x" * 300,
    "ünï",
    "nan",
    "a,b",
    ",",
    "k=v",
    "beta=0.5",
    "epochs=0",
    "lambda_up=-1",
    "tissue_ratio",
    "tissue_ratio:0.3,0.6",
    "tissue_ratio:q4",
    "site:cat",
    ":",
    "small_cnn",
    "timm:nope",
    "cpu",
    "cuda",
    "auto",
    "gerne",
    "loss",
    "worst_group_accuracy",
    "ray",
    "local",
    "uint16",
    "zstd",
    "image",
    "region",
    "threshold",
    "dark",
    "negative",
    "2",
    "1,2",
    "0.6,0.2,0.2",
    "0.5,0.5",
]
#: Arguments that keep an accepted command cheap (it may override them).
BASE = {
    "patchify": ["{data}", "out", "--patch-size", "32", "--input-size", "8"],
    "train": ["{toy}", "--out", "run", "--epochs", "1", "--device", "cpu", "--quiet"],
    "evaluate": ["{run}", "--bootstrap", "5", "--device", "cpu"],
    "synth": ["out", "--images", "1", "--size", "96"],
    "audit": ["{toy}", "--bootstrap", "5"],
    "report": ["{run}", "--bootstrap", "5"],
    "sweep": ["{sweep}", "--status"],
    "check": ["{run}"],
}
#: `demo` chains the commands above with its own settings; a run of it takes minutes.
FUZZED = sorted(BASE)


def _kinds(name: str) -> dict[str, tuple[list[str], bool, bool]]:
    """Option flag -> (candidate values, is a flag, repeatable) for command ``name``."""
    command = typer.main.get_command(app).commands[name]
    callback = next(c.callback for c in app.registered_commands if c.name == name)
    hints = typing.get_type_hints(callback)
    kinds = {}
    for param in command.params:
        if not param.opts[0].startswith("-"):
            continue
        hint = str(hints[param.name])
        pool = INTS if "int" in hint else FLOATS if "float" in hint else TEXT
        if name == "train" and param.name == "method":
            pool = [*TEXT, *method_names()]
        kinds[param.opts[0]] = (pool, bool(param.is_flag), bool(param.multiple))
    return kinds


def _argv(draw: Any, name: str, paths: dict[str, str]) -> list[str]:
    base = [a.format(**paths) for a in BASE[name]]
    kinds = _kinds(name)
    options = draw(st.lists(st.sampled_from(sorted(kinds)), max_size=5)) if kinds else []
    argv = [name]
    if draw(st.booleans()):  # the positional argument itself hostile
        base[0] = draw(st.sampled_from([*TEXT, *paths.values()]))
    argv += base
    for option in options:
        pool, flag, _ = kinds[option]
        argv += [option] if flag else [option, draw(st.sampled_from(pool))]
    if draw(st.booleans()):
        argv.append(draw(st.sampled_from(["--nope", "stray", "-x"])))
    return argv


@pytest.mark.parametrize("name", FUZZED)
@given(draw=st.data())
def test_command_arguments_never_end_in_a_traceback(
    name: str,
    draw: Any,
    root: Path,
    toy: Path,
    run: Path,
    data: Path,
    sweep_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    paths = {"toy": str(toy), "run": str(run), "data": str(data), "sweep": str(sweep_file)}
    argv = _argv(draw.draw, name, paths)
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, argv)
    note = f"unshortcut {' '.join(argv)}\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{note}\n{result.exception!r}"
    )
    assert result.exit_code in (0, 1, 2), note
    assert "Traceback" not in result.output, note
    if result.exit_code == 2 and "error:" in result.output:
        assert len([ln for ln in result.output.splitlines() if ln.startswith("error:")]) == 1
