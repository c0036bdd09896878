"""Sweeps: grids or random searches of runs over datasets, methods, taus and seeds.

- :mod:`.config`: the sweep file (TOML) as one validated object;
- :mod:`.store`: run folders named by a hash of their configuration, their status, and
  the one function a worker calls to train (or resume, or skip) a run;
- :mod:`.launchers`: where runs execute: local processes or a Ray cluster;
- :mod:`.plan`: the phases (trials, validation-only selection, seeds, ablations), the
  status of a sweep and its results table.
"""

from unshortcut.sweep.config import SweepConfig, load_sweep
from unshortcut.sweep.plan import SweepResult, run_sweep, sweep_status, write_results

__all__ = [
    "SweepConfig",
    "SweepResult",
    "load_sweep",
    "run_sweep",
    "sweep_status",
    "write_results",
]
