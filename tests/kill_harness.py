"""Kill -9 at random points, then rerun or resume: the harness of tests/test_kill.py and
bench/reliability.py.

A :class:`Scenario` is one command of the real CLI in a fresh process: how to prepare its
workspace, the command, the command that continues it, how far it has got (a count of
finished units: images, epochs, runs), what a reader may see at any moment, and which
output bytes must equal those of an uninterrupted run. Another command (``generate``,
``predict``) is one more Scenario.

:func:`campaign` runs the command once undisturbed (the reference, which also counts the
units), then again with SIGKILL sent to its whole process group at seeded random points:
once ``k`` units are done, plus a random part of one unit's time (``k = 0``: during
start-up). Each kill restarts from what the previous one left; the last rerun finishes,
and the outputs are compared. A watcher thread reads the output the whole time: it may
find nothing, or something unfinished that says so, never a half-written patch set,
checkpoint or run folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from reliability_helpers import CLI, cli_env
from unshortcut.atomic import leftovers, temporary_name
from unshortcut.errors import UnshortcutError
from unshortcut.generate import load_generator
from unshortcut.runs import open_run, verify_run
from unshortcut.sealed import read_sealed
from unshortcut.tiling.patchset import PatchSet

#: States a reader may find, from nothing to done.
ABSENT, UNFINISHED, COMPLETE = "absent", "unfinished", "complete"


@dataclass(frozen=True)
class Scenario:
    """One command to kill and continue."""

    name: str
    prepare: Callable[[Path], None]
    """Fills a fresh workspace (inputs; an old run to overwrite or extend)."""
    command: list[str]
    """Arguments after ``unshortcut``, run in the workspace."""
    rerun: Callable[[Path], list[str]] | None
    """What a user runs after a kill, given what the workspace holds (None: the same
    command again)."""
    outputs: Callable[[Path], dict[str, bytes]]
    """The bytes that must equal an uninterrupted run's."""
    progress: Callable[[Path], int]
    """Units of work finished so far in a workspace (monotone while the command runs)."""
    read: Callable[[Path], str]
    """What a reader sees now (ABSENT, UNFINISHED, COMPLETE); raises AssertionError (or
    anything but a clean UnshortcutError) on a half-written output."""
    allowed: frozenset[str] = frozenset({ABSENT, UNFINISHED, COMPLETE})
    """States a reader may ever see (replacing a finished run: COMPLETE only)."""
    watched: tuple[str, ...] = ()
    """Folders (relative to the workspace) that must hold no leftovers at the end."""


@dataclass
class Outcome:
    """One campaign: what was done to a scenario and what came of it."""

    scenario: str
    kills: int = 0
    """SIGKILLs that hit a running process."""
    missed: int = 0
    """Kill times drawn after the process had already finished."""
    reads: int = 0
    states: set[str] = field(default_factory=set)
    survived: bool = False
    """The last rerun finished and its outputs equal the uninterrupted run's."""
    lost: list[str] = field(default_factory=list)
    """Outputs that differ or are missing, states a reader must not see, leftovers."""
    seconds: float = 0.0


def run_cli(
    argv: list[str],
    cwd: Path,
    kill_at: tuple[Callable[[], int], int, float] | None = None,
    watch: bool = False,
) -> tuple[int, bool, str]:
    """Run ``unshortcut argv`` in ``cwd``. With ``kill_at = (progress, k, delay)``, SIGKILL
    its process group ``delay`` seconds after ``progress()`` first reaches ``k`` (with
    ``watch``, only call ``progress`` until the end). Returns (exit code, whether it was
    killed, output)."""
    with tempfile.TemporaryFile() as log:  # not in cwd: that disk may be the full one
        process = subprocess.Popen(
            [*CLI, *argv],
            cwd=cwd,
            env=cli_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: workers die with it, as in a real kill
        )
        killed = False
        if kill_at is not None:
            progress, target, delay = kill_at
            while process.poll() is None and (watch or progress() < target):
                if watch:
                    progress()
                time.sleep(0.01)
            deadline = time.monotonic() + delay
            while process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                killed = True
        process.wait()
        log.seek(0)
        return process.returncode, killed, log.read().decode(errors="replace")


class Watcher(threading.Thread):
    """Reads a scenario's output over and over while the command runs."""

    def __init__(self, scenario: Scenario, workspace: Path) -> None:
        super().__init__(daemon=True)
        self.scenario, self.workspace = scenario, workspace
        self.stop = threading.Event()
        self.states: list[str] = []
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.states.append(self.scenario.read(self.workspace))
            except Exception as error:  # a half-written output, or a reader's traceback
                self.failures.append(f"{type(error).__name__}: {error}")
            time.sleep(0.05)


def campaign(
    scenario: Scenario, root: Path, kills: int, seed: int, reference: Path | None = None
) -> Outcome:
    """Reference run, ``kills`` kills at seeded random moments, a last rerun; compared.

    ``reference`` reuses the workspace of an earlier :func:`timed_reference`.
    """
    began = time.monotonic()
    outcome = Outcome(scenario.name)
    reference = reference or timed_reference(scenario, root / "reference")
    unit = _unit_seconds(reference)
    units = max(scenario.progress(reference), 1)
    expected = scenario.outputs(reference)
    workspace = root / f"killed-{seed}"
    workspace.mkdir(parents=True)
    scenario.prepare(workspace)
    rng = np.random.default_rng([seed, kills])
    watcher = Watcher(scenario, workspace)
    watcher.start()
    argv = scenario.command
    for i in range(kills):
        # The first kill lands before the last unit is done, so it always hits.
        target = int(rng.integers(0, units - 1 if i == 0 and units > 1 else units))
        delay = float(rng.uniform(0, 1)) * unit
        point = (lambda: scenario.progress(workspace), target, delay)
        code, killed, output = run_cli(argv, workspace, kill_at=point)
        if killed:
            outcome.kills += 1
        else:
            outcome.missed += 1
            assert code == 0, f"{scenario.name} failed before its kill:\n{output}"
        argv = scenario.rerun(workspace) if scenario.rerun else scenario.command
    code, _, output = run_cli(argv, workspace)
    watcher.stop.set()
    watcher.join()
    outcome.reads, outcome.states = len(watcher.states), set(watcher.states)
    outcome.lost += watcher.failures
    outcome.lost += [f"a reader saw {s}" for s in outcome.states - scenario.allowed]
    if code != 0:
        outcome.lost.append(f"the rerun failed (exit {code}): {output[-2000:]}")
    else:
        found = scenario.outputs(workspace)
        outcome.lost += [f"{k}: differs" for k in expected if found.get(k) != expected[k]]
        outcome.lost += [f"{k}: unexpected" for k in found.keys() - expected.keys()]
    for folder in scenario.watched:
        outcome.lost += [f"leftover {p}" for p in leftovers(workspace / folder)]
    outcome.survived = not outcome.lost
    outcome.seconds = time.monotonic() - began
    return outcome


def timed_reference(scenario: Scenario, folder: Path) -> Path:
    """Run the scenario undisturbed in ``folder``, recording when each unit of work was
    done (``.units``: seconds from the start, one line per unit)."""
    folder.mkdir(parents=True)
    scenario.prepare(folder)
    start, done, times = time.monotonic(), scenario.progress(folder), []

    def watch() -> int:
        nonlocal done
        now = scenario.progress(folder)
        times.extend([time.monotonic() - start] * max(now - done, 0))
        done = max(done, now)
        return -1  # never reached: the command runs to the end

    code, _, output = run_cli(scenario.command, folder, kill_at=(watch, 0, 0.0), watch=True)
    assert code == 0, f"uninterrupted {scenario.name} failed:\n{output}"
    watch()
    (folder / ".units").write_text("".join(f"{t}\n" for t in times))
    return folder


def _unit_seconds(reference: Path) -> float:
    """Typical time of one unit of work in the reference (start-up excluded)."""
    times = [float(t) for t in (reference / ".units").read_text().split()]
    if len(times) >= 2:
        return float(np.median(np.diff(times)))
    return times[0] / 4 if times else 1.0


# ------------------------------------------------------------------------ readers


def _same_folder(path: Path, read: Callable[[], str]) -> str:
    """``read()`` of a folder that may be swapped for a new one meanwhile: a read that
    straddles a swap (its files from two versions) is repeated."""
    for _ in range(20):
        before = path.stat().st_ino if path.exists() else None
        try:
            state = read()
        except (AssertionError, UnshortcutError):
            after = path.stat().st_ino if path.exists() else None
            if after != before:
                continue
            raise
        after = path.stat().st_ino if path.exists() else None
        if after == before:
            return state
    raise AssertionError(f"{path}: swapped 20 times during one read")


def read_patch_set(path: Path) -> str:
    """A patch set is absent or complete and intact (it is renamed into place whole)."""

    def read() -> str:
        if not path.exists():
            return ABSENT
        try:
            patch_set = PatchSet.open(path)
        except UnshortcutError as error:
            if not path.exists():
                return ABSENT
            raise AssertionError(f"half-written patch set: {error}") from None
        problems = patch_set.verify()
        assert not problems, f"half-written patch set: {problems}"
        return COMPLETE

    return _same_folder(path, read)


def read_run(path: Path) -> str:
    """A run folder is absent, unfinished (no metrics.json) or complete and intact."""

    def read() -> str:
        if not (path / "config.json").is_file():
            return ABSENT
        open_run(path)
        if not (path / "metrics.json").is_file():
            return UNFINISHED
        problems = verify_run(path)
        assert not problems, f"half-written run: {problems}"
        return COMPLETE

    return _same_folder(path, read)


def read_sweep(out: Path) -> str:
    """A sweep's results.json is absent or complete; every run in it is readable."""
    if not (out / "results.json").is_file():
        runs = sorted((out / "runs").glob("*")) if (out / "runs").is_dir() else []
        for run in runs:
            if not run.name.startswith(".") and not run.name.endswith(".partial"):
                read_run(run)
        return UNFINISHED if runs else ABSENT
    results = read_sealed(out / "results.json")
    assert results["rows"], "results.json without rows"
    for row in results["rows"]:
        for run in row["runs"]:
            assert read_run(Path(run)) == COMPLETE
    return COMPLETE


def read_generator_run(path: Path) -> str:
    """A generator run is absent (no config.json), unfinished (no generator.pt; any
    checkpoint loads) or complete (the generator loads)."""
    if not (path / "config.json").is_file():
        return ABSENT
    checkpoint = path / "checkpoints" / "last.pt"
    try:
        if checkpoint.is_file():
            torch.load(checkpoint, weights_only=False)
        if not (path / "generator.pt").is_file():
            return UNFINISHED
        load_generator(path, "cpu")
    except (FileNotFoundError, UnshortcutError):
        # generator.pt is removed when a resumed run trains on: read again
        if not (path / "generator.pt").is_file():
            return UNFINISHED
        raise
    return COMPLETE


#: What every ``unshortcut predict`` image folder holds (a run without a pixel decoder).
PREDICTION_FILES = [
    "predictions.parquet",
    "predictions.geojson",
    "tumor.geojson",
    "overlay.png",
    "shaky.png",
]


def read_predictions(out: Path, images: int) -> str:
    """Each image folder of ``unshortcut predict`` is absent or complete (all files, a
    readable table, empty for an image without tissue); COMPLETE once all ``images``
    are there."""
    folders = finished_folders(out)
    for folder in folders:
        missing = [n for n in PREDICTION_FILES if not (folder / n).is_file()]
        assert not missing, f"half-written {folder}: {missing} missing"
        pd.read_parquet(folder / "predictions.parquet")  # a half-written one fails
    if not folders:
        return ABSENT
    return COMPLETE if len(folders) == images else UNFINISHED


def files(root: Path, names: list[str]) -> dict[str, bytes]:
    """The bytes of ``names`` under ``root`` (missing files left out)."""
    return {n: (root / n).read_bytes() for n in names if (root / n).is_file()}


# ----------------------------------------------------------------------- progress


def parts_done(patches: Path) -> int:
    """Images tiled: finished parts of an unfinished patchify, all images of a finished one."""
    manifest = patches / "manifest.json"
    if manifest.is_file():
        return len(read_sealed(manifest)["images"])
    parts = patches.with_name(f"{patches.name}.partial") / "parts"
    return sum(1 for p in parts.glob("*") if not p.name.startswith(".")) if parts.is_dir() else 0


def epochs_done(run: Path) -> int:
    """Epochs in history.jsonl of the run's unfinished replacement, or of the run."""
    for folder in (run.with_name(f"{run.name}.partial"), run):
        history = folder / "history.jsonl"
        if history.is_file():
            return len(history.read_text().splitlines())
    return 0


def finished_folders(out: Path) -> list[Path]:
    """Folders in ``out`` that are no one's temporary (hidden names are)."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))


def atomic_write_done(target: Path) -> int:
    """0 before a folder written at once (:func:`unshortcut.atomic.atomic_directory`) is
    begun, 1 while a live process builds it, 2 once it is in place."""
    if target.exists():
        return 2
    prefix = temporary_name(target).split(".tmp-")[0] + ".tmp-"
    building = [p for p in target.parent.glob(f"{prefix}*") if p not in leftovers(target.parent)]
    return 1 if building else 0


def runs_done(sweep: Path) -> int:
    """Finished runs of a sweep."""
    return len(list((sweep / "runs").glob("*/metrics.json")))
