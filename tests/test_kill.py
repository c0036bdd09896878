"""Kill -9 at random (seeded) moments during patchify, train, an overwrite, an extension,
a sweep, ``generate train``, ``generate sample`` and ``predict``; the rerun (or
``--resume``) ends with the bytes of an uninterrupted run, and a reader polling the
output meanwhile never finds a half-written one.

Every registered method is killed once. bench/reliability.py runs many more kills.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kill_harness import (
    COMPLETE,
    PREDICTION_FILES,
    Outcome,
    Scenario,
    atomic_write_done,
    campaign,
    epochs_done,
    files,
    finished_folders,
    parts_done,
    read_generator_run,
    read_patch_set,
    read_predictions,
    read_run,
    read_sweep,
    runs_done,
)
from reliability_helpers import copy_folder
from test_data import write_toy_patch_set
from test_generate_e2e import write_generator_toy
from unshortcut.config import TrainConfig
from unshortcut.generate import GeneratorConfig, train_generator
from unshortcut.methods import method_names
from unshortcut.runs import content_digest
from unshortcut.synth import generate_dataset, make_config
from unshortcut.tiling.patchify import PatchifyConfig, patchify
from unshortcut.train import train

pytestmark = [pytest.mark.kill, pytest.mark.slow]

PATCH_SET = ["pixels.npy", "masks.npy", "patches.parquet", "manifest.json"]
RUN = [
    "config.json",
    "history.jsonl",
    "metrics.json",
    "predictions/val.parquet",
    "predictions/test.parquet",
]
TRAIN = ["--device", "cpu", "--quiet", "--batch-size", "32", "--lr", "0.02"]
TRAIN += ["--config", "train.toml"]


def write_train_toml(ws: Path) -> None:
    """Settings the command line has no flag for: fewer bootstrap resamples, one thread."""
    (ws / "train.toml").write_text("bootstrap = 50\nnum_threads = 1\n")


def run_outputs(run: Path) -> dict[str, bytes]:
    """A run's files, and its checkpoints by content: their bytes may differ (the pickle
    shares equal objects differently in a resumed process) while the tensors and values,
    hashed in each checkpoint's integrity stamp, may not."""
    found = files(run, RUN)
    for checkpoint in sorted((run / "checkpoints").glob("*.pt")):
        stamp = torch.load(checkpoint, weights_only=False)["integrity"]["sha256"]
        found[f"{checkpoint.relative_to(run)} (content)"] = stamp.encode()
    return found


def patchify_scenario(data: Path, workers: int) -> Scenario:
    return Scenario(
        name=f"patchify --workers {workers}",
        prepare=lambda ws: None,
        command=[
            "patchify",
            str(data),
            "patches",
            "--patch-size",
            "32",
            "--input-size",
            "8",
            "--workers",
            str(workers),
        ],
        rerun=None,
        outputs=lambda ws: files(ws / "patches", PATCH_SET),
        progress=lambda ws: parts_done(ws / "patches"),
        read=lambda ws: read_patch_set(ws / "patches"),
        allowed=frozenset({"absent", COMPLETE}),
        watched=(".",),
    )


def _resume_or_start(command: list[str]) -> object:
    """After a kill a user resumes the run, or starts it again if it never began."""

    def rerun(ws: Path) -> list[str]:
        started = (ws / "run" / "config.json").is_file() or (ws / "run.partial").is_dir()
        return ["train", "--resume", "--out", "run", "--quiet"] if started else command

    return rerun


def train_scenario(patches: Path, method: str, epochs: int = 2) -> Scenario:
    command = [
        "train",
        str(patches),
        "--out",
        "run",
        "--method",
        method,
        "--epochs",
        str(epochs),
        *TRAIN,
    ]
    return Scenario(
        name=f"train {method}",
        prepare=write_train_toml,
        command=command,
        rerun=_resume_or_start(command),
        outputs=lambda ws: run_outputs(ws / "run"),
        progress=lambda ws: epochs_done(ws / "run"),
        read=lambda ws: read_run(ws / "run"),
        watched=(".", "run", "run/checkpoints"),
    )


def replace_scenario(patches: Path, old: Path, extend: bool) -> Scenario:
    """--overwrite of a finished run, or --resume --epochs of one: readers must see a
    finished run at every moment (the old one, then the new one)."""
    if extend:
        command = ["train", "--resume", "--out", "run", "--epochs", "4", "--quiet"]
        rerun = None
    else:
        command = [
            "train",
            str(patches),
            "--out",
            "run",
            "--method",
            "cb_erm",
            "--epochs",
            "3",
            "--overwrite",
            *TRAIN,
        ]

        def rerun(ws: Path) -> list[str]:
            partial = (ws / "run.partial" / "config.json").is_file()
            return ["train", "--resume", "--out", "run", "--quiet"] if partial else command

    def prepare(ws: Path) -> None:
        write_train_toml(ws)
        copy_folder(old, ws / "run")

    return Scenario(
        name="train --resume --epochs 4" if extend else "train --overwrite",
        prepare=prepare,
        command=command,
        rerun=rerun,
        outputs=lambda ws: run_outputs(ws / "run"),
        progress=lambda ws: epochs_done(ws / "run"),
        read=lambda ws: read_run(ws / "run"),
        allowed=frozenset({COMPLETE}),
        watched=(".", "run", "run/checkpoints"),
    )


def sweep_scenario(patches: Path) -> Scenario:
    text = (
        f'name = "k"\nout = "sweep"\nmethods = ["erm", "gerne"]\nseeds = 2\n'
        f'[datasets]\ntoy = "{patches}"\n[search]\ntrials = 1\n'
        "[train]\nepochs = 2\nbatch_size = 32\nbootstrap = 50\nnum_threads = 1\n"
        'device = "cpu"\n'
    )

    def outputs(ws: Path) -> dict[str, bytes]:
        results = json.loads((ws / "sweep" / "results.json").read_text())
        rows = json.dumps(results["rows"]).replace(str(ws), "WS").encode()
        runs = {
            p.relative_to(ws).as_posix(): p.read_bytes()
            for p in sorted((ws / "sweep" / "runs").glob("*/metrics.json"))
        }
        return {"rows": rows, **runs}

    return Scenario(
        name="sweep",
        prepare=lambda ws: (ws / "sweep.toml").write_text(text) and None,
        command=["sweep", "sweep.toml"],
        rerun=None,
        outputs=outputs,
        progress=lambda ws: runs_done(ws / "sweep"),
        read=lambda ws: read_sweep(ws / "sweep"),
        watched=(".", "sweep", "sweep/runs"),
    )


#: A generator small enough to train in seconds (tests/test_generate_e2e.py's TINY).
GENERATOR = {
    "widths": [16, 32],
    "attention": [False, False],
    "head_channels": 16,
    "batch_size": 16,
    "sample_steps": 2,
    "quality_epochs": 1,
    "num_threads": 1,
    "device": "cpu",
}
GENERATOR_TOML = (
    "widths = [16, 32]\nattention = [false, false]\nhead_channels = 16\nbatch_size = 16\n"
    "sample_steps = 2\nquality_epochs = 1\nnum_threads = 1\n"
)


def _without_seconds(obj: object) -> object:
    """``obj`` without its ``seconds`` entries (wall-clock times differ between runs)."""
    if isinstance(obj, dict):
        return {k: _without_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_without_seconds(v) for v in obj]
    return obj


def generator_outputs(run: Path) -> dict[str, bytes]:
    """A generator run's config, history and checkpoints by content, times left out."""
    found = files(run, ["config.json"])
    history = (run / "history.jsonl").read_text().splitlines() if run.is_dir() else []
    found["history.jsonl"] = json.dumps([_without_seconds(json.loads(h)) for h in history]).encode()
    for name in ("checkpoints/last.pt", "generator.pt"):
        if (run / name).is_file():
            state = torch.load(run / name, weights_only=False)
            found[f"{name} (content)"] = content_digest(_without_seconds(state)).encode()
    return found


def generate_train_scenario(patches: Path, epochs: int = 3) -> Scenario:
    command = ["generate", "train", str(patches), "--out", "gen", "--epochs", str(epochs),
               "--config", "gen.toml", "--quiet"]  # fmt: skip

    def rerun(ws: Path) -> list[str]:
        """Resume once the run has its config.json; before that, start again."""
        return [*command, "--resume"] if (ws / "gen" / "config.json").is_file() else command

    def epochs_done(ws: Path) -> int:
        history = ws / "gen" / "history.jsonl"
        return len(history.read_text().splitlines()) if history.is_file() else 0

    return Scenario(
        name="generate train",
        prepare=lambda ws: (ws / "gen.toml").write_text(GENERATOR_TOML) and None,
        command=command,
        rerun=rerun,
        outputs=lambda ws: generator_outputs(ws / "gen"),
        progress=epochs_done,
        read=lambda ws: read_generator_run(ws / "gen"),
        watched=(".", "gen", "gen/checkpoints"),
    )


def _workspace_free(data: bytes, ws: Path) -> bytes:
    """File bytes with the workspace's path (which differs between runs) replaced."""
    return data.replace(str(ws.resolve()).encode(), b"WS").replace(str(ws).encode(), b"WS")


def generate_sample_scenario(generator: Path) -> Scenario:
    """A new patch set from a finished generator: absent, or complete with its quality
    report. Rerun after a kill: the same command, or ``check`` once it is in place."""
    command = ["generate", "sample", str(generator), "--out", "sample", "--count", "6",
               "--device", "cpu", "--quiet"]  # fmt: skip

    def outputs(ws: Path) -> dict[str, bytes]:
        found = files(ws / "sample", [*PATCH_SET, "quality/quality.json"])
        return {k: _workspace_free(v, ws) for k, v in found.items()}

    return Scenario(
        name="generate sample",
        prepare=lambda ws: None,
        command=command,
        rerun=lambda ws: ["check", "sample"] if (ws / "sample").exists() else command,
        outputs=outputs,
        progress=lambda ws: atomic_write_done(ws / "sample"),
        read=lambda ws: read_patch_set(ws / "sample"),
        allowed=frozenset({"absent", COMPLETE}),
        watched=(".",),
    )


def predict_scenario(run: Path, images: list[Path]) -> Scenario:
    """One folder per image, each written whole; after a kill the user reruns the
    command, with --overwrite once some folders are there."""
    command = ["predict", str(run), *map(str, images), "--out", "pred", "--device", "cpu",
               "--thumbnail-size", "128"]  # fmt: skip

    def outputs(ws: Path) -> dict[str, bytes]:
        found = {}
        for folder in finished_folders(ws / "pred"):
            for name, data in files(folder, PREDICTION_FILES).items():
                found[f"{folder.name}/{name}"] = data
        return found

    return Scenario(
        name="predict",
        prepare=lambda ws: None,
        command=command,
        rerun=lambda ws: [*command, "--overwrite"] if finished_folders(ws / "pred") else command,
        outputs=outputs,
        progress=lambda ws: len(finished_folders(ws / "pred")),
        read=lambda ws: read_predictions(ws / "pred", len(images)),
        watched=(".", "pred"),
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    generate_dataset(make_config(images=6, size=256, seed=2), root / "data")
    patches = write_toy_patch_set(root / "patches", n=240)
    done = {}
    for name, epochs in (("old", 1), ("two", 2)):
        config = TrainConfig(
            patches=patches,
            out=root / name,
            epochs=epochs,
            batch_size=32,
            lr=0.02,
            device="cpu",
            num_threads=1,
        )
        done[name] = train(config, progress=False)
    return {"data": root / "data", "patches": patches, **done}


@pytest.fixture(scope="module")
def generator_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A generator's patch set and a finished generator run on it."""
    root = tmp_path_factory.mktemp("generator")
    patches = write_generator_toy(root / "patches")
    config = GeneratorConfig(patches=patches, out=root / "gen", epochs=1, **GENERATOR)
    return {"patches": patches, "generator": train_generator(config)}


@pytest.fixture(scope="module")
def predict_inputs(
    inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """A run trained on patchify's cut of the synthetic images (predict cuts as it did)."""
    root = tmp_path_factory.mktemp("predict")
    patches = patchify(inputs["data"], root / "patches", PatchifyConfig(patch_size=32,
                                                                        input_size=8))  # fmt: skip
    config = TrainConfig(patches=patches.path, out=root / "run", epochs=1, batch_size=32,
                         lr=0.02, device="cpu", num_threads=1, bootstrap=0)  # fmt: skip
    return {"run": train(config, progress=False), "images": inputs["data"] / "images"}


def _check(outcome: Outcome) -> None:
    """Survived, and was really killed (a kill drawn after the end hits nothing)."""
    assert outcome.survived, "\n".join(outcome.lost)
    assert outcome.kills >= 1, outcome


@pytest.mark.parametrize("workers", [1, 2])
def test_killed_patchify_reruns_to_the_same_bytes(
    inputs: dict[str, Path], tmp_path: Path, workers: int
) -> None:
    _check(campaign(patchify_scenario(inputs["data"], workers), tmp_path, kills=2, seed=workers))


@pytest.mark.parametrize("method", method_names())
def test_killed_training_resumes_to_the_same_bytes(
    inputs: dict[str, Path], tmp_path: Path, method: str
) -> None:
    seed = method_names().index(method)
    _check(campaign(train_scenario(inputs["patches"], method), tmp_path, kills=1, seed=seed))


@pytest.mark.parametrize("extend", [False, True], ids=["overwrite", "extend"])
def test_a_finished_run_stays_readable_while_it_is_replaced(
    inputs: dict[str, Path], tmp_path: Path, extend: bool
) -> None:
    old = inputs["two"] if extend else inputs["old"]
    _check(campaign(replace_scenario(inputs["patches"], old, extend), tmp_path, kills=2, seed=7))


def test_killed_sweep_continues_to_the_same_results(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    _check(campaign(sweep_scenario(inputs["patches"]), tmp_path, kills=2, seed=11))


def test_killed_generator_training_resumes_to_the_same_weights(
    generator_inputs: dict[str, Path], tmp_path: Path
) -> None:
    scenario = generate_train_scenario(generator_inputs["patches"])
    _check(campaign(scenario, tmp_path, kills=2, seed=13))


def test_killed_sampling_leaves_no_half_written_patch_set(
    generator_inputs: dict[str, Path], tmp_path: Path
) -> None:
    scenario = generate_sample_scenario(generator_inputs["generator"])
    _check(campaign(scenario, tmp_path, kills=2, seed=17))


def test_killed_predict_leaves_only_whole_image_folders(
    predict_inputs: dict[str, Path], tmp_path: Path
) -> None:
    images = sorted(predict_inputs["images"].glob("*.tif"))
    _check(campaign(predict_scenario(predict_inputs["run"], images), tmp_path, kills=2, seed=19))
