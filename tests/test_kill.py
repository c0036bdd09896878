"""Kill -9 at random (seeded) moments during patchify, train, an overwrite, an extension
and a sweep; the rerun (or ``--resume``) ends with the bytes of an uninterrupted run, and
a reader polling the output meanwhile never finds a half-written one.

Every registered method is killed once; ``generate`` and ``predict`` join as one more
Scenario each (tests/kill_harness.py). bench/reliability.py runs many more kills.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kill_harness import (
    COMPLETE,
    Outcome,
    Scenario,
    campaign,
    epochs_done,
    files,
    parts_done,
    read_patch_set,
    read_run,
    read_sweep,
    runs_done,
)
from reliability_helpers import copy_folder
from test_data import write_toy_patch_set
from unshortcut.config import TrainConfig
from unshortcut.methods import method_names
from unshortcut.synth import generate_dataset, make_config
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
