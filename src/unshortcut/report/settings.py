"""Group runs into settings (same configuration, different seeds) and summarise their metrics.

A folder may hold one run, several seeds of several methods, or a sweep. Runs whose
resolved configurations agree on everything but the seed, the output folder and the
machine (device, threads, prefetching) are one *setting*; a setting's metric is the
mean and standard deviation over its seeds, a single run's is its value with its
image-bootstrap interval. Settings are named by method, plus whatever distinguishes
settings of the same method (``gerne (hp.beta=1.0)``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from unshortcut.report.formatting import MISSING, pct, pct_ci
from unshortcut.report.run_folders import RunFolder

PER_RUN_KEYS = ("out", "seed", "device", "num_threads", "prefetch")
"""Configuration keys that differ between seeds of one setting or between machines."""
DERIVED_KEYS = ("groups", "normalization", "input", "robust_bins_by_class", "unshortcut_version")
"""Keys computed from the data; part of a setting's identity, but never of its name."""


@dataclass(frozen=True)
class Setting:
    """Runs that differ only by seed; ``label`` names the setting in tables and plots."""

    label: str
    runs: tuple[RunFolder, ...]

    @property
    def method(self) -> str:
        return self.runs[0].method

    @property
    def config(self) -> dict[str, Any]:
        return self.runs[0].config

    @property
    def seeds(self) -> list[int | None]:
        return [run.seed for run in self.runs]

    def values(self, split: str, key: str, criterion: str | None = None) -> list[float | None]:
        """``key`` of ``split`` in every run, at the primary checkpoint or ``criterion``'s."""
        return [_metrics(run, split, criterion).get(key) for run in self.runs]

    def summary(self, split: str, key: str, criterion: str | None = None) -> str:
        """'81.2 [75.0, 86.1]' for one run, '81.2 ± 2.1' (mean ± sd over seeds) for several."""
        if len(self.runs) == 1:
            metrics = _metrics(self.runs[0], split, criterion)
            return pct_ci(metrics.get(key), metrics.get(f"{key}_ci"))
        return mean_sd(self.values(split, key, criterion))

    def mean(self, split: str, key: str, criterion: str | None = None) -> float | None:
        present = [v for v in self.values(split, key, criterion) if v is not None]
        return float(np.mean(present)) if present else None


def _metrics(run: RunFolder, split: str, criterion: str | None) -> dict[str, Any]:
    if criterion is None or criterion == run.criterion:
        return dict(run.metrics.get(split) or {})
    return dict(run.metrics.get("by_criterion", {}).get(criterion, {}).get(split) or {})


def mean_sd(values: Sequence[float | None]) -> str:
    """Mean ± sample standard deviation in percent; n is noted when some values are undefined."""
    present = [v for v in values if v is not None and math.isfinite(v)]
    if not present:
        return MISSING
    sd = float(np.std(present, ddof=1)) if len(present) > 1 else 0.0
    text = f"{pct(float(np.mean(present)))} ± {pct(sd)}"
    return text if len(present) == len(values) else f"{text} (n={len(present)})"


def _identity(config: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in PER_RUN_KEYS}, sort_keys=True)


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in config.items():
        if not prefix and key in (*PER_RUN_KEYS, *DERIVED_KEYS):
            continue
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = json.dumps(value)
    return flat


def group_settings(runs: Sequence[RunFolder]) -> list[Setting]:
    """Settings in a stable order: erm first, then by method and label; runs ordered by seed."""
    by_identity: dict[str, list[RunFolder]] = {}
    for run in runs:
        by_identity.setdefault(_identity(run.config), []).append(run)
    groups = [
        sorted(g, key=lambda r: (r.seed is None, r.seed or 0, str(r.path)))
        for g in by_identity.values()
    ]
    labelled = []
    for runs_of_setting in groups:
        method = runs_of_setting[0].method
        same_method = [g[0].config for g in groups if g[0].method == method]
        flats = [_flat(c) for c in same_method]
        keys = sorted({k for f in flats for k in f})
        differing = [k for k in keys if len({f.get(k) for f in flats}) > 1]
        own = _flat(runs_of_setting[0].config)
        details = ", ".join(f"{k}={json.loads(own[k]) if k in own else MISSING}" for k in differing)
        label = f"{method} ({details})" if details else method
        labelled.append(Setting(label, tuple(runs_of_setting)))
    return sorted(labelled, key=lambda s: (s.method != "erm", s.method, s.label))
