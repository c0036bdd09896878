"""How GERNE's defaults were chosen: a grid on the default synthetic benchmark, validation only.

For each tau, GERNE (known attributes) trains at seed 0 with every (c, beta) of a small
grid, and GERNE without attributes with every t (at GERNE's chosen c and beta); the
defaults are the settings with the best validation worst-group accuracy averaged over
the taus (settings infeasible at some tau are left out). Test values are never read.
Runs use the hand-made runner's folders, settings and resume logic (bench/trial_runner.py,
the layout bench/robustness.py used before it became a sweep), under ``--work``.

Writes bench/results/gerne_defaults.json (rows: one per setting and tau) and prints the
tables; the method cards quote the choice.

Usage: ``python bench/gerne_defaults.py [--taus 0.5 0.75] [--epochs 12]``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from robustness import ROOT, Runner, Settings, build_patches, machine, train_split
from unshortcut.atomic import atomic_write_text
from unshortcut.errors import UnshortcutError
from unshortcut.methods import get_method
from unshortcut.search import TRAINING_HPARAMS, Trial, read_run

BETAS = (0.25, 0.5, 1.0, 1.5, 2.0)
CS = (0.5, 1.0)
TS = (0.005, 0.02, 0.05, 0.1, 0.2)
CRITERION = "worst_group_accuracy"


def feasible(method: str, hp: dict[str, Any], taus: tuple[float, ...], patches: Path) -> bool:
    cls = get_method(method)
    full = {name: h.default for name, h in cls.hparams.items()} | hp
    try:
        for tau in taus:
            cls.check_hparams(full, train_split(patches, tau))
    except UnshortcutError:
        return False
    return True


def grid(runner: Runner, method: str, settings: list[dict[str, Any]], taus: tuple[float, ...]):
    """Validation WGA of every setting at every tau (seed 0); rows for the JSON."""
    defaults = {name: h.default for name, h in get_method(method).hparams.items()}
    training = {name: h.default for name, h in TRAINING_HPARAMS.items()}
    rows = []
    for index, hp in enumerate(settings):
        values = []
        for tau in taus:
            trial = Trial(method, 100 + index, 0, defaults | hp, training)
            run = runner.run(tau, trial, seed=0, variant="defaults-grid")
            value = (
                read_run(run).val_scores.get(CRITERION)
                if (run / "metrics.json").is_file()
                else None
            )
            values.append(value)
            rows.append({"method": method, **hp, "tau": tau, f"val_{CRITERION}": value})
        mean = None if None in values else sum(values) / len(values)
        rows.append({"method": method, **hp, "tau": "mean", f"val_{CRITERION}": mean})
    return rows


def best(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    means = [r for r in rows if r["tau"] == "mean" and r[f"val_{CRITERION}"] is not None]
    top = max(means, key=lambda r: r[f"val_{CRITERION}"])
    return {k: top[k] for k in keys}


def table(rows: list[dict[str, Any]], keys: tuple[str, ...], taus: tuple[float, ...]) -> str:
    lines = [
        "| "
        + " | ".join(keys)
        + " | "
        + " | ".join(f"val WGA tau {t:g}" for t in taus)
        + " | mean |",
        "|" + "---|" * (len(keys) + len(taus) + 1),
    ]
    by_setting: dict[tuple, dict[Any, Any]] = {}
    for r in rows:
        by_setting.setdefault(tuple(r[k] for k in keys), {})[r["tau"]] = r[f"val_{CRITERION}"]
    for setting, values in by_setting.items():
        cells = [
            ("n/a" if values.get(t) is None else f"{100 * values[t]:.1f}") for t in (*taus, "mean")
        ]
        lines.append("| " + " | ".join(map(str, setting)) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--taus", nargs="+", type=float, default=[0.5, 0.75])
    parser.add_argument("--epochs", type=int, default=Settings.epochs)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--work", type=Path, default=ROOT / "bench" / "work" / "robustness" / "synth"
    )
    parser.add_argument(
        "--results", type=Path, default=ROOT / "bench" / "results" / "gerne_defaults.json"
    )
    args = parser.parse_args()
    taus = tuple(args.taus)
    patches = build_patches("synth")
    settings = Settings(taus=taus, epochs=args.epochs, threads=args.threads)
    known = [{"c": c, "beta": b} for c in CS for b in BETAS]
    known = [hp for hp in known if feasible("gerne", hp, taus, patches)]
    runner = Runner(patches, args.work, settings, expected=len(known) * len(taus))
    gerne_rows = grid(runner, "gerne", known, taus)
    chosen = best(gerne_rows, ("c", "beta"))
    unknown = [chosen | {"t": t} for t in TS]
    unknown = [hp for hp in unknown if feasible("gerne_unknown", hp, taus, patches)]
    runner.expected += len(unknown) * len(taus)
    unknown_rows = grid(runner, "gerne_unknown", unknown, taus)
    chosen_t = best(unknown_rows, ("t",))
    text = (
        "GERNE (known attributes), seed 0, validation worst-group accuracy (%):\n\n"
        + table(gerne_rows, ("c", "beta"), taus)
        + f"\n\nChosen: {chosen}\n\nGERNE without attributes at {chosen}:\n\n"
        + table(unknown_rows, ("t",), taus)
        + f"\n\nChosen: {chosen_t}\n"
    )
    print(text)
    atomic_write_text(
        args.results,
        json.dumps(
            {
                "rows": gerne_rows + unknown_rows,
                "chosen": {"gerne": chosen, "gerne_unknown": chosen | chosen_t},
                "criterion": f"validation {CRITERION}, mean over tau {list(taus)}",
                "epochs": args.epochs,
                "command": shlex.join(["python", "bench/gerne_defaults.py", *sys.argv[1:]]),
                "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": machine(),
            },
            indent=2,
        )
        + "\n",
    )


if __name__ == "__main__":
    main()
