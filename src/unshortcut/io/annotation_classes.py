"""Which annotation classes are tumor, which are carved out, and the file extensions.

Kept apart from the parsers (:mod:`unshortcut.io.annotations`) so the command line can
show the defaults without importing shapely.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from unshortcut.errors import UnshortcutError

ANNOTATION_EXTENSIONS = frozenset({".geojson", ".json", ".xml"})
DEFAULT_TUMOR_CLASSES = ("Tumor", "metastases", "_0", "_1")
DEFAULT_EXCLUDE_CLASSES = ("Exclusion", "_2", "normal")
UNCLASSIFIED = "unclassified"


@dataclass(frozen=True)
class AnnotationClasses:
    """Which annotation classes are tumor and which are carved out of it."""

    tumor: tuple[str, ...] = DEFAULT_TUMOR_CLASSES
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE_CLASSES

    def validate(self) -> None:
        if not self.tumor:
            raise UnshortcutError("--tumor-classes: give at least one class name")
        both = {c.casefold() for c in self.tumor} & {c.casefold() for c in self.exclude}
        if both:
            raise UnshortcutError(
                f"--tumor-classes/--exclude-classes: {', '.join(sorted(both))} given as both"
            )

    def role(self, names: Iterable[str]) -> str | None:
        """'exclude', 'tumor' or None for a polygon whose class (and parents) are ``names``."""
        folded = {name.casefold() for name in names}
        if folded & {c.casefold() for c in self.exclude}:
            return "exclude"
        if folded & {c.casefold() for c in self.tumor}:
            return "tumor"
        return None
