"""Sweeps: grids or random searches of runs over datasets, methods, taus and seeds.

- :mod:`.config`: the sweep file (TOML) as one validated object;
- :mod:`.store`: run folders named by a hash of their configuration, their status, the
  one function a worker calls to train (or resume, or skip) a run, and the adoption of
  a run trained outside the sweep;
- :mod:`.launchers`: where runs execute: local processes or a Ray cluster;
- :mod:`.plan`: the phases (trials, validation-only selection, seeds, ablations), the
  status of a sweep, the adoption of an older experiment's runs, and its results table
  (with the same runs rescored at another criterion's checkpoint).
"""

from unshortcut.sweep.config import SweepConfig, load_sweep
from unshortcut.sweep.plan import (
    SweepResult,
    adopt_runs,
    checkpoint_row,
    run_sweep,
    sweep_status,
    write_results,
)

__all__ = [
    "SweepConfig",
    "SweepResult",
    "adopt_runs",
    "checkpoint_row",
    "load_sweep",
    "run_sweep",
    "sweep_status",
    "write_results",
]
