"""The report as data: sections of paragraphs, tables, figures and code blocks.

The audit and the run report describe their content once, as a :class:`Document`;
``unshortcut.report.html`` and ``unshortcut.report.markdown`` render the same
document, so the HTML page and its Markdown twin cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Paragraph:
    text: str
    emphasis: bool = False
    """Shown as a call-out (verdicts, the selection protocol)."""


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""
    numeric: tuple[bool, ...] = ()
    """Per column: right-aligned numbers (default: every column but the first)."""

    def is_numeric(self, index: int) -> bool:
        return self.numeric[index] if self.numeric else index > 0


@dataclass(frozen=True)
class Figure:
    png: bytes
    caption: str
    name: str
    """File stem for the Markdown twin's image folder; made unique by the renderer."""


@dataclass(frozen=True)
class Code:
    text: str
    summary: str = ""
    """Collapsed under this summary in HTML when given."""


Block = Paragraph | Bullets | Table | Figure | Code


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)
    subsections: list[Section] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return slug(self.title)


@dataclass
class Document:
    title: str
    subtitle: str = ""
    sections: list[Section] = field(default_factory=list)

    def figures(self) -> list[Figure]:
        """Every figure in reading order."""
        found: list[Figure] = []

        def walk(section: Section) -> None:
            found.extend(b for b in section.blocks if isinstance(b, Figure))
            for sub in section.subsections:
                walk(sub)

        for section in self.sections:
            walk(section)
        return found


def slug(text: str) -> str:
    """Lower-case letters, digits and dashes: an anchor or file name from any title."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def figure_files(document: Document) -> dict[int, str]:
    """A unique PNG file name per figure (keyed by ``id``), in reading order."""
    names: dict[int, str] = {}
    used: set[str] = set()
    for figure in document.figures():
        stem, k = slug(figure.name), 1
        name = f"{stem}.png"
        while name in used:
            k += 1
            name = f"{stem}-{k}.png"
        used.add(name)
        names[id(figure)] = name
    return names
