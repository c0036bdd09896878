"""Run folders named by a hash of their configuration, and the one job a worker runs.

A run's folder is ``<root>/runs/<method>-<key>`` where ``key`` hashes every setting that
changes what the run computes (not where it is written, nor how many threads it uses:
``RESUME_FREE_FIELDS``). A relaunched sweep therefore finds its finished runs, resumes
interrupted ones from their last checkpoint, and never mixes two configurations in one
folder. A run is finished when its ``metrics.json`` exists (the run folder writes it
last); ``diverged.txt`` marks a run whose loss became NaN (final, not retried).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Literal

from unshortcut.atomic import atomic_write_text
from unshortcut.config import RESUME_FREE_FIELDS, TrainConfig
from unshortcut.errors import UnshortcutError
from unshortcut.runs import CHECKPOINTS, LAST, config_differences, partial_run, read_json

DIVERGED = "diverged.txt"
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
