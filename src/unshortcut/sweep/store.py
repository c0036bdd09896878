"""Run folders named by a hash of their configuration, and the one job a worker runs.

A run's folder is ``<root>/runs/<method>-<key>`` where ``key`` hashes every setting that
changes what the run computes (not where it is written, nor how many threads it uses:
``RESUME_FREE_FIELDS``). A relaunched sweep therefore finds its finished runs, resumes
interrupted ones from their last checkpoint, and never mixes two configurations in one
folder. A run is finished when its ``metrics.json`` exists (the run folder writes it
last); ``diverged.txt`` marks a run whose loss became NaN (final, not retried).

:func:`adopt_run` brings a run trained outside the sweep (an older benchmark script, a
hand-made folder) into its hashed folder after checking that it computed exactly what the
sweep's run would, so moving an experiment onto a sweep retrains nothing.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Literal

from unshortcut.atomic import atomic_directory, atomic_write_text
from unshortcut.config import RESUME_FREE_FIELDS, TrainConfig
from unshortcut.errors import UnshortcutError
from unshortcut.runs import (
    CHECKPOINTS,
    CHECKSUMS,
    LAST,
    config_differences,
    partial_run,
    read_json,
    with_newer_fields,
    write_checksums,
    write_json,
)

DIVERGED = "diverged.txt"
ADOPTED = "adopted.txt"
"""Written into an adopted run folder: where the run was trained."""
Status = Literal["finished", "diverged", "interrupted", "pending"]
KEY_LENGTH = 12


def run_key(config: TrainConfig) -> str:
    """A short stable hash of what the run computes."""
    fields = {k: v for k, v in config.to_json_dict().items() if k not in RESUME_FREE_FIELDS}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:KEY_LENGTH]


def run_folder(root: Path, config: TrainConfig) -> Path:
    return root / "runs" / f"{config.method}-{run_key(config)}"


def run_status(folder: Path) -> Status:
    if (folder / "metrics.json").is_file():
        return "finished"
    if (folder / DIVERGED).is_file():
        return "diverged"
    if (folder / CHECKPOINTS / LAST).is_file() or (
        partial_run(folder) / CHECKPOINTS / LAST
    ).is_file():
        return "interrupted"
    return "pending"


def execute(config_json: dict[str, Any]) -> tuple[Status, list[str]]:
    """Train (or resume) one run; what a local process or a Ray task calls.

    Takes and returns plain data so that it crosses process boundaries. Returns the
    final status and the warnings the run raised (the launcher prints each text once).
    """
    from unshortcut.evaluate import metric_warnings
    from unshortcut.train import TrainingDiverged, train

    config = TrainConfig(**config_json)
    status = run_status(config.out)
    if status in ("finished", "diverged"):
        differ = config_differences(read_json(config.out / "config.json"), config)
        if differ:
            raise UnshortcutError(f"{config.out}: holds a run with other settings ({differ})")
        return status, []
    resume = status == "interrupted"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            train(config, resume=resume, overwrite=not resume, progress=False)
        except TrainingDiverged as error:
            atomic_write_text(config.out / DIVERGED, f"{error}\n")
    status = run_status(config.out)
    texts = [str(w.message) for w in caught]
    if status == "finished":
        metrics = read_json(config.out / "metrics.json")
        # By method, not by run: a sweep's many runs of one method share most warnings.
        texts += [f"{config.method}: {text}" for text in metric_warnings(metrics)]
    return status, texts


def adoption_differences(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """Settings of ``config`` that the run saved as ``saved`` (its config.json) did not use.

    Two differences are not differences: a field the saved config lacks (added to
    TrainConfig after the run) that ``config`` leaves at its default, and a ``patches``
    folder elsewhere that holds the same files byte for byte.
    """
    differ = config_differences(saved, config)
    if "patches" in differ and same_patch_set(Path(saved["patches"]), config.patches):
        differ.remove("patches")
    return differ


def same_patch_set(a: Path, b: Path) -> bool:
    """Whether two patch set folders hold the same file names with the same bytes."""
    if not a.is_dir() or not b.is_dir():
        return False
    names = sorted(p.name for p in a.iterdir() if p.is_file())
    if names != sorted(p.name for p in b.iterdir() if p.is_file()):
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return not mismatch and not errors


def adopt_run(source: Path, config: TrainConfig) -> bool:
    """Bring the finished (or diverged) run ``source`` into the sweep folder ``config.out``.

    Refuses, naming every differing setting, a run trained otherwise than ``config``
    says. The folder is hard-linked where the filesystem allows (copied elsewhere), so
    ``source`` stays as it is; its config.json is rewritten (a new file, never through
    the links) with the sweep's ``out``, ``patches`` and the defaults of newer fields, so
    the sweep's own checks accept it later. Returns False when ``config.out`` already
    holds this run (adopting twice changes nothing).
    """
    source, target = Path(source), config.out
    if run_status(source) not in ("finished", "diverged"):
        raise UnshortcutError(f"{source}: not a finished run (no metrics.json); not adopted")
    saved = read_json(source / "config.json")
    differ = adoption_differences(saved, config)
    if differ:
        raise UnshortcutError(
            f"{source}: trained with other settings than the sweep's run "
            f"({', '.join(differ)}); not adopted"
        )
    if target.exists():
        if run_status(target) in ("finished", "diverged") and not config_differences(
            read_json(target / "config.json"), config
        ):
            return False
        raise UnshortcutError(f"{target}: already holds another run; delete it to adopt {source}")
    adopted = with_newer_fields(saved, config) | {
        "out": str(target),
        "patches": str(config.patches),
    }
    with atomic_directory(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True, copy_function=_link_or_copy)
        write_json(tmp / "config.json", adopted)
        if (tmp / CHECKSUMS).is_file():  # it vouches for config.json too: say the new one
            write_checksums(tmp)
        atomic_write_text(tmp / ADOPTED, f"{source.resolve()}\n")
    return True


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, target)
