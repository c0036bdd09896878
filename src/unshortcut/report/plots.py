"""PNG plots for the audit and the report, drawn from numbers (never from a model).

Each function takes plain arrays and returns PNG bytes, ready to embed in HTML or to
write beside Markdown. Figures are built with matplotlib's object API on the Agg
canvas, so nothing touches pyplot's global state or needs a display, and the PNGs
carry no time stamp: the same numbers give the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from unshortcut.groups import CLASS_NAMES

CLASS_COLOURS = ("#4c72b0", "#dd8452")
SERIES_COLOURS = (
    "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3",
    "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd",
)  # fmt: skip
DPI = 110


def series_colour(index: int) -> str:
    return SERIES_COLOURS[index % len(SERIES_COLOURS)]


def _legend(figure: Figure, ax: Any) -> None:
    """One legend above the panels, where it hides no data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        columns = min(len(handles), 5)
        figure.legend(
            handles, labels, loc="outside upper center", ncols=columns, frameon=False, fontsize=8
        )


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def distribution_png(
    column: str, distribution: Mapping[str, Any], thresholds: Sequence[float]
) -> bytes:
    """The attribute's training distribution per class: density histograms or category shares."""
    figure = Figure(figsize=(6.4, 3.4), layout="constrained")
    ax = figure.add_subplot()
    counts = distribution["counts"]
    if "edges" in distribution:
        edges = np.asarray(distribution["edges"])
        widths = np.diff(edges)
        for y, name in enumerate(CLASS_NAMES):
            n = np.asarray(counts[name], dtype=float)
            density = n / max(n.sum(), 1) / widths
            ax.stairs(
                density,
                edges,
                fill=True,
                alpha=0.45,
                color=CLASS_COLOURS[y],
                label=f"{name} (n={int(n.sum())})",
            )
        for k, tau in enumerate(thresholds):
            ax.axvline(
                tau, color="#1d232a", linestyle="--", linewidth=1, label="tau" if k == 0 else None
            )
        ax.set_xlabel(column)
        ax.set_ylabel("density (train)")
    else:
        categories = list(distribution["categories"])
        x = np.arange(len(categories))
        for y, name in enumerate(CLASS_NAMES):
            n = np.asarray(counts[name], dtype=float)
            share = n / max(n.sum(), 1)
            ax.bar(
                x + (y - 0.5) * 0.4,
                share,
                width=0.4,
                color=CLASS_COLOURS[y],
                label=f"{name} (n={int(n.sum())})",
            )
        ax.set_xticks(
            x,
            categories,
            rotation=30 if len(categories) > 4 else 0,
            ha="right" if len(categories) > 4 else "center",
        )
        ax.set_xlabel(column)
        ax.set_ylabel("share within class (train)")
    ax.legend(frameon=False, fontsize=8)
    return _png(figure)


def error_png(
    column: str,
    bins: Sequence[str],
    edges: Sequence[float],
    rates: Mapping[str, np.ndarray],
) -> bytes:
    """Error rate per attribute bin, one panel per class, one line per series (split or method).

    Numeric attributes give bin ``edges`` (points at the bin centres), categorical ones
    none (one tick per bin name). ``rates[series]`` is (n_classes, n_bins) with NaN for
    bins left out. For non-tumor patches an error is a false positive, for tumor
    patches a false negative.
    """
    figure = Figure(figsize=(9.0, 3.4), layout="constrained")
    axes = figure.subplots(1, len(CLASS_NAMES), sharey=True)
    edge_array = np.asarray(edges, dtype=float)
    x = (edge_array[:-1] + edge_array[1:]) / 2 if len(edge_array) else np.arange(len(bins))
    titles = ("non-tumor patches: false-positive rate", "tumor patches: false-negative rate")
    for y, ax in enumerate(axes):
        for k, (series, rate) in enumerate(rates.items()):
            ax.plot(x, np.asarray(rate)[y], marker="o", color=series_colour(k), label=series)
        ax.set_title(titles[y], fontsize=10)
        ax.set_xlabel(column)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        if len(edge_array):
            ax.set_xlim(edge_array[0], edge_array[-1])
        else:
            ax.set_xticks(x, list(bins), rotation=30, ha="right")
    axes[0].set_ylabel("error rate")
    _legend(figure, axes[0])
    return _png(figure)


def group_accuracy_png(
    groups: Sequence[str], panels: Mapping[str, Mapping[str, Sequence[float | None]]]
) -> bytes:
    """Horizontal bars: accuracy (%) per group, one bar per series, one panel per split."""
    height = 1.2 + 0.32 * len(groups) * max(1, len(next(iter(panels.values()), {})))
    figure = Figure(figsize=(9.0, min(height, 14.0)), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(panels), sharey=True))
    y = np.arange(len(groups))
    for ax, (title, series) in zip(axes, panels.items(), strict=True):
        width = 0.8 / max(len(series), 1)
        for k, (name, values) in enumerate(series.items()):
            heights = [np.nan if v is None else 100 * v for v in values]
            ax.barh(
                y + (k - (len(series) - 1) / 2) * width,
                heights,
                height=width,
                color=series_colour(k),
                label=name,
            )
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, 100)
        ax.set_xlabel("accuracy (%)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, list(groups))
    axes[0].invert_yaxis()
    _legend(figure, axes[0])
    return _png(figure)


CURVES = (
    ("train loss", "train_loss", None),
    ("validation loss", "loss", "val"),
    ("validation worst-group accuracy", "worst_group_accuracy", "val"),
    ("validation balanced accuracy", "balanced_accuracy", "val"),
)


def training_curves_png(
    runs: Sequence[tuple[str, int, Sequence[Mapping[str, Any]], int | None]],
) -> bytes:
    """Loss and validation accuracy per epoch, one line per run.

    ``runs`` holds (label, colour index, history, selected epoch). Runs of one setting
    (seeds) share a label and a colour; the selected epoch is drawn as a ring.
    """
    figure = Figure(figsize=(10.0, 6.0), layout="constrained")
    axes = figure.subplots(2, 2).ravel()
    labelled: set[str] = set()
    for label, colour, history, selected in runs:
        epochs = [h.get("epoch") for h in history]
        for ax, (title, key, split) in zip(axes, CURVES, strict=True):
            values = [_curve_value(h, key, split) for h in history]
            ax.plot(
                epochs,
                values,
                color=series_colour(colour),
                alpha=0.85,
                label=None if label in labelled else label,
            )
            if selected is not None and selected in epochs:
                ax.plot(
                    [selected],
                    [values[epochs.index(selected)]],
                    marker="o",
                    markersize=9,
                    markerfacecolor="none",
                    color=series_colour(colour),
                )
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        labelled.add(label)
    _legend(figure, axes[0])
    return _png(figure)


def _curve_value(entry: Mapping[str, Any], key: str, split: str | None) -> float:
    source = entry.get(split, {}) if split else entry
    value = source.get(key) if isinstance(source, Mapping) else None
    return np.nan if value is None else float(value)
