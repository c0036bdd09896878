"""Helpers of the reliability tests: read-only folders, damaged files, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

#: How a test starts the real command line in a fresh process.
CLI = [
    sys.executable,
    "-c",
    "import sys; from unshortcut.cli import app; sys.argv[0] = 'unshortcut'; app()",
]


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: this checkout's sources, one torch thread."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


@contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """``folder`` made unwritable: by its mode, or for root (whom modes do not stop) by
    the immutable attribute; skipped where neither is possible."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip("root on a file system without chattr +i: no folder is read-only")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def flip_bytes(path: Path, offset: int, count: int = 4) -> None:
    """Invert ``count`` bytes of ``path`` from ``offset`` (negative: from the end)."""
    data = bytearray(path.read_bytes())
    start = offset % len(data)
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def copy_folder(source: Path, target: Path) -> Path:
    """A byte copy of a folder (no hard links: the tests damage the copy)."""
    target.mkdir(parents=True)
    for file in source.rglob("*"):
        if file.is_file():
            (target / file.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            (target / file.relative_to(source)).write_bytes(file.read_bytes())
    return target


def assert_one_line_error(result: Any, *fragments: str) -> str:
    """A CliRunner result that failed cleanly: exit 2, one ``error:`` line, no traceback.

    Returns the error line; every fragment must be in it.
    """
    output = result.output
    assert result.exit_code == 2, output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]
