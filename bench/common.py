"""What the bench scripts share: a metric over repeats as {mean, std, values}, and the
results file (bench/results/<name>.json: a ``rows`` list plus how it was made)."""

from __future__ import annotations

import json
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from unshortcut.atomic import atomic_write_text


def stat(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value) and the values."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "values": values}


def format_stat(stat: dict[str, Any] | None, scale: float = 1.0, digits: int = 3) -> str:
    """``mean ± std`` of a {mean, std, values} metric, times ``scale``; "n/a" when undefined."""
    if not stat or stat["mean"] is None:
        return "n/a"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def format_pct(stat: dict[str, Any] | None) -> str:
    """A {mean, std, values} fraction as percent with one decimal."""
    return format_stat(stat, 100, 1)


def format_hparams(hp: dict[str, Any]) -> str:
    """Hyperparameters as ``k=v`` pairs, floats to 3 significant digits."""
    if not hp:
        return "(none)"
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items())


def write_results(path: Path, rows: list[dict[str, Any]], **facts: Any) -> None:
    """The rows, the command that produced them (this script's argv) and the date."""
    script = Path(sys.argv[0]).name
    record = {
        "rows": rows,
        **facts,
        "command": shlex.join(["python", f"bench/{script}", *sys.argv[1:]]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
