"""Shared fixtures (paths to the real data in ../shared/data) and hypothesis profiles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Fuzzing profiles. "ci" (the default) keeps the suite to minutes on two cores: a fixed
# number of examples drawn from a fixed seed (the same inputs every run, no example
# database written into the checkout), no per-example deadline (a loaded machine is
# not a bug). "thorough" is for hunting: HYPOTHESIS_PROFILE=thorough pytest -m fuzz.
settings.register_profile(
    "ci",
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(  # bench/reliability.py: many examples, still reproducible
    "bench",
    parent=settings.get_profile("ci"),
    max_examples=int(os.environ.get("HYPOTHESIS_BENCH_EXAMPLES", "200")),
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: ../shared/data beside the repository; UNSHORTCUT_SHARED_DATA points elsewhere (a git
#: worktree one folder deeper, say).
SHARED_DATA = Path(
    os.environ.get("UNSHORTCUT_SHARED_DATA")
    or Path(__file__).resolve().parents[2] / "shared" / "data"
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real histology subsets (never copied into the repository)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is not present beside the repository")
    return SHARED_DATA
