"""``unshortcut check``: read a patch set or a run folder completely and say what is wrong.

Opening a patch set or a run checks only what is cheap (formats, versions, sizes,
headers); this reads every byte against the checksums recorded when it was written,
and names leftovers of killed runs beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from unshortcut.atomic import leftovers
from unshortcut.errors import UnshortcutError
from unshortcut.runs import partial_run, verify_run
from unshortcut.tiling.patchset import MANIFEST_FILE, PatchSet


@dataclass
class CheckResult:
    """What ``check`` found: the kind of folder, its problems, and notes around it."""

    path: Path
    kind: str
    """'patch set' or 'run'."""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_folder(path: Path | str) -> CheckResult:
    """Verify ``path`` completely, as a patch set (manifest.json) or a run (config.json)."""
    path = Path(path)
    if not path.is_dir():
        raise UnshortcutError(f"{path}: no such folder")
    if (path / MANIFEST_FILE).is_file():
        result = CheckResult(path, "patch set", PatchSet.open(path).verify())
    elif (path / "config.json").is_file():
        result = CheckResult(path, "run", verify_run(path))
    else:
        raise UnshortcutError(
            f"{path}: neither a patch set (no {MANIFEST_FILE}) nor a run folder (no config.json)"
        )
    partial = partial_run(path)
    if partial.is_dir():
        result.notes.append(
            f"{partial}: an unfinished run or patchify that will replace or extend this one "
            "(the same command, or train --resume, continues it)"
        )
    for folder in (path.parent, path, path / "checkpoints"):
        for leftover in leftovers(folder):
            result.notes.append(
                f"{leftover}: left by a killed run; the next run writing there removes it"
            )
    return result
