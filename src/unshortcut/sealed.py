"""JSON files that carry a SHA-256 of their own content.

A flipped byte in a JSON file mostly breaks its syntax, but not always: a digit of a
count or of a normalisation statistic changes silently. Manifests, run configurations,
metrics and checksum tables therefore hold ``content_sha256``, the hash of the rest of
their content in a canonical form (sorted keys, no spaces); :func:`read_sealed` checks
and removes it. Files without it (written before seals existed) are read as they are.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from unshortcut.errors import UnshortcutError

SEAL = "content_sha256"


def _digest(data: dict[str, Any]) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (strict JSON values) with its content hash added."""
    content = {k: v for k, v in data.items() if k != SEAL}
    return {**content, SEAL: _digest(content)}


def read_sealed(path: Path | str) -> Any:
    """A JSON file's content, its seal checked and removed; a one-line error when the file
    is unreadable or does not match its seal."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UnshortcutError(f"{path}: unreadable ({error})") from None
    if isinstance(data, dict) and SEAL in data:
        recorded = data.pop(SEAL)
        try:
            same = _digest(data) == recorded
        except ValueError:  # NaN or inf: never written by us
            same = False
        if not same:
            raise UnshortcutError(
                f"{path}: damaged (its content does not match its content_sha256)"
            )
    return data
