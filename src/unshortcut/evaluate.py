"""Score a finished run again, on its own patch set or another one.

A run folder carries everything needed: the architecture and input statistics in
``config.json``, the group scheme fitted on its training split, and the finalized
weights of each selected checkpoint (``checkpoints/final-<criterion>.pt``). Another
patch set is binned with the run's own thresholds and normalised with the run's own
training statistics, so the numbers are comparable with the run's metrics.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from unshortcut.atomic import atomic_directory
from unshortcut.config import TrainConfig
from unshortcut.data import Normalization
from unshortcut.errors import UnshortcutError
from unshortcut.groups import GroupScheme
from unshortcut.models import Classifier, build_model
from unshortcut.train import (
    infer,
    jsonable,
    load_run_data,
    predictions_table,
    resolve_device,
    score_split,
)

EVAL_SPLITS = ("val", "test")


@dataclass
class Run:
    """A run folder's resolved configuration."""

    path: Path
    config: TrainConfig
    resolved: dict[str, Any]

    @property
    def scheme(self) -> GroupScheme:
        return GroupScheme.from_dict(self.resolved["groups"])

    @property
    def normalization(self) -> Normalization:
        return Normalization.from_dict(self.resolved["normalization"])

    @property
    def metrics(self) -> dict[str, Any]:
        path = self.path / "metrics.json"
        if not path.is_file():
            raise UnshortcutError(f"{path}: missing; the run is unfinished (train --resume it)")
        return json.loads(path.read_text(encoding="utf-8"))


def open_run(path: Path | str) -> Run:
    """Read ``RUN/config.json``; a clear error when ``path`` is not a run folder."""
    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        raise UnshortcutError(f"{path}: not a run folder (no config.json)")
    try:
        resolved = json.loads(file.read_text(encoding="utf-8"))
        fields = {k: v for k, v in resolved.items() if k in TrainConfig.model_fields}
        config = TrainConfig(**fields)
    except ValueError as error:
        raise UnshortcutError(f"{file}: unreadable run configuration ({error})") from None
    return Run(path, config, resolved)


def load_model(
    run: Run, criterion: str | None = None, device: torch.device | str = "cpu"
) -> Classifier:
    """The finalized model selected by ``criterion`` (default: the run's primary one)."""
    criterion = criterion or run.config.primary_criterion
    path = run.path / "checkpoints" / f"final-{criterion}.pt"
    if not path.is_file():
        raise UnshortcutError(f"{path}: missing (criteria of this run: {run.config.select_by})")
    info = run.resolved["input"]
    model = build_model(
        run.config.model,
        int(info["channels"]),
        run.scheme.n_classes,
        int(info["size"]),
    )
    state = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def evaluate_run(
    run_path: Path | str,
    patches: Path | str | None = None,
    *,
    name: str | None = None,
    criterion: str | None = None,
    bootstrap: int | None = None,
    device: str = "auto",
) -> tuple[Path, dict[str, Any]]:
    """Score the selected checkpoint on ``patches`` (default: the run's own patch set).

    Writes ``RUN/evaluation/<name>/`` (``metrics.json`` and ``predictions/``), where
    ``name`` defaults to the patch set folder's name, and returns it with the metrics.
    """
    run = open_run(run_path)
    patches = Path(patches) if patches is not None else run.config.patches
    criterion = criterion or run.config.primary_criterion
    dev = resolve_device(device)
    data = load_run_data(
        patches,
        device=dev,
        splits=EVAL_SPLITS,
        scheme=run.scheme,
        normalization=run.normalization,
        rare_attribute=list(run.resolved["rare_attribute_by_class"]),
    )
    info = run.resolved["input"]
    if (data.patchset.channels, data.patchset.input_size) != (info["channels"], info["size"]):
        raise UnshortcutError(
            f"{patches}: patches have {data.patchset.channels} channel(s) at "
            f"{data.patchset.input_size} px, the run was trained on {info['channels']} at "
            f"{info['size']} px"
        )
    model = load_model(run, criterion, dev)
    n_boot = run.config.bootstrap if bootstrap is None else bootstrap
    metrics: dict[str, Any] = {
        "run": str(run.path),
        "patches": str(patches),
        "criterion": criterion,
        "epoch": run.metrics["selection"]["by_criterion"].get(criterion),
    }
    probs = {s: infer(model, data.loaders[s]) for s in EVAL_SPLITS}
    for s in EVAL_SPLITS:
        metrics[s] = score_split(data, s, probs[s], bootstrap=n_boot, seed=run.config.seed)
    metrics["group_names"] = list(run.scheme.group_names)
    out = run.path / "evaluation" / (name or Path(patches).resolve().name)
    with atomic_directory(out, overwrite=True) as folder:
        (folder / "predictions").mkdir()
        for s in EVAL_SPLITS:
            predictions_table(data, s, probs[s]).to_parquet(
                folder / "predictions" / f"{s}.parquet", index=False
            )
        text = json.dumps(jsonable(metrics), indent=2, allow_nan=False) + "\n"
        (folder / "metrics.json").write_text(text, encoding="utf-8")
    return out, metrics


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _with_ci(metrics: dict[str, Any], key: str) -> str:
    ci = metrics.get(f"{key}_ci")
    text = _pct(metrics.get(key))
    return text if not ci else f"{text} [{_pct(ci[0])}, {_pct(ci[1])}]"


HEADLINE = (
    ("worst-group accuracy", "worst_group_accuracy"),
    ("balanced accuracy", "balanced_accuracy"),
    ("group-balanced accuracy", "group_balanced_accuracy"),
    ("accuracy", "accuracy"),
    ("AUROC", "auroc"),
    ("robust AUROC", "robust_auroc"),
)


def results_tables(metrics: dict[str, Any], title: str) -> tuple[Table, Table]:
    """Per-group accuracy with counts, and the headline metrics with 95% CIs (in %)."""
    splits = [s for s in EVAL_SPLITS if s in metrics]
    groups = Table(title=f"{title}: accuracy per group (%)")
    groups.add_column("group")
    for s in splits:
        groups.add_column(f"{s} n", justify="right")
        groups.add_column(f"{s} acc", justify="right")
    for group in metrics[splits[0]]["groups"]:
        cells = []
        for s in splits:
            g = metrics[s]["groups"][group]
            cells += [str(g["n"]), _pct(g["accuracy"])]
        groups.add_row(group, *cells)
    headline = Table(title=f"{title}: headline metrics (%, 95% image-bootstrap CI)")
    headline.add_column("metric")
    for s in splits:
        headline.add_column(s, justify="right")
    for label, key in HEADLINE:
        headline.add_row(label, *(_with_ci(metrics[s], key) for s in splits))
    return groups, headline
