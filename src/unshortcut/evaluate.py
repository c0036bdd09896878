"""Score a finished run again, on its own patch set or another one.

A run folder carries everything needed: the architecture and input statistics in
``config.json``, the group scheme fitted on its training split, and the finalized
weights of each selected checkpoint (``checkpoints/final-<criterion>.pt``). Another
patch set is binned with the run's own thresholds and normalised with the run's own
training statistics, so the numbers are comparable with the run's metrics.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from unshortcut.atomic import atomic_directory
from unshortcut.errors import UnshortcutError
from unshortcut.inference import (
    infer,
    load_run_data,
    predictions_table,
    resolve_device,
    score_split,
)
from unshortcut.runs import load_model, open_run, write_json

EVAL_SPLITS = ("val", "test")


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

    On the run's own patch set, validation rows the method trained on (DFR's half) are
    left out exactly as training left them out, so the numbers reproduce metrics.json.
    Writes ``RUN/evaluation/<name>/`` (``metrics.json`` and ``predictions/``), where
    ``name`` defaults to the patch set folder's name, and returns it with the metrics.
    """
    if bootstrap is not None and bootstrap < 0:
        raise UnshortcutError(f"--bootstrap: must be 0 or more resamples, got {bootstrap}")
    if name is not None:
        check_folder_name(name, "--name")
    run = open_run(run_path)
    patches = Path(patches).resolve() if patches is not None else run.config.patches
    criterion = criterion or run.config.primary_criterion
    dev = resolve_device(device)
    data = load_run_data(
        patches,
        device=dev,
        splits=EVAL_SPLITS,
        scheme=run.scheme,
        normalization=run.normalization,
        robust_bins=run.robust_bins,
        channels_last=run.config.uses_channels_last(dev.type),
    )
    info = run.resolved["input"]
    if (data.patchset.channels, data.patchset.input_size) != (info["channels"], info["size"]):
        raise UnshortcutError(
            f"{patches}: patches have {data.patchset.channels} channel(s) at "
            f"{data.patchset.input_size} px, the run was trained on {info['channels']} at "
            f"{info['size']} px"
        )
    trained_on = None
    if patches == run.config.patches:
        ids = data.table("val")["patch_id"].to_numpy()
        trained_on = np.flatnonzero(np.isin(ids, run.trained_on_val()))
    model = load_model(run, criterion, dev)
    n_boot = run.config.bootstrap if bootstrap is None else bootstrap
    metrics: dict[str, Any] = {
        "run": str(run.path),
        "patches": str(patches),
        "criterion": criterion,
        "epoch": run.metrics["selection"]["by_criterion"].get(criterion),
    }
    bf16 = run.config.uses_bf16(dev.type)
    inferred = {s: infer(model, data.loaders[s], bf16=bf16) for s in EVAL_SPLITS}
    kept = (
        None if trained_on is None else np.setdiff1d(np.arange(len(data.splits["val"])), trained_on)
    )
    for s in EVAL_SPLITS:
        metrics[s] = score_split(
            data, s, inferred[s].log_probs, bootstrap=n_boot, seed=run.config.seed,
            rows=kept if s == "val" else None, pixel_counts=inferred[s].pixel_counts,
        )  # fmt: skip
    metrics["group_names"] = list(run.scheme.group_names)
    out = run.path / "evaluation" / (name or patches.name)
    with atomic_directory(out, overwrite=True) as folder:
        (folder / "predictions").mkdir()
        for s in EVAL_SPLITS:
            predictions_table(
                data,
                s,
                inferred[s].log_probs,
                trained_on if s == "val" else None,
                inferred[s].pixel_counts,
            ).to_parquet(folder / "predictions" / f"{s}.parquet", index=False)
        write_json(folder / "metrics.json", metrics)
    return out, metrics


def check_folder_name(name: str, option: str) -> None:
    """``name`` must be one plain folder name: it may not lead out of the run folder."""
    if name in ("", ".", "..") or Path(name).name != name or "/" in name or "\\" in name:
        raise UnshortcutError(
            f"{option}: {name!r} is not a plain folder name (no '/', '..' or empty names)"
        )


def metric_warnings(metrics: dict[str, Any]) -> list[str]:
    """Every split's metric warnings, each text once, prefixed by its split; first, why
    training stopped early, when it did."""
    stopped = metrics.get("stopped_early")
    lines: list[str] = [f"training stopped early: {stopped}"] if stopped else []
    for split in EVAL_SPLITS:
        for text in (metrics.get(split) or {}).get("warnings", []):
            line = f"{split}: {text}"
            if line not in lines:
                lines.append(line)
    return lines


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
