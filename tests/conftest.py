"""Shared fixtures: paths to the real data in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
