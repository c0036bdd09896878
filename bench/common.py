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
