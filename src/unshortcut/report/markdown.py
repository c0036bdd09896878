"""Render a :class:`~unshortcut.report.document.Document` as Markdown with image files.

The Markdown twin of the HTML page is for reading in a repository, a wiki or a
terminal and for diffing between runs. Markdown cannot embed images portably, so the
figures are returned as PNG files for a folder next to the ``.md`` file.
"""

from __future__ import annotations

from unshortcut.report.document import (
    Block,
    Bullets,
    Code,
    Document,
    Figure,
    Paragraph,
    Section,
    Table,
    figure_files,
)


def render_markdown(document: Document, image_folder: str) -> tuple[str, dict[str, bytes]]:
    """The Markdown text, and the PNG files it links to (names inside ``image_folder``)."""
    names = figure_files(document)
    lines = [f"# {document.title}", ""]
    if document.subtitle:
        lines += [document.subtitle, ""]
    for section in document.sections:
        lines += _section(section, 2, names, image_folder)
    files = {names[id(f)]: f.png for f in document.figures()}
    return "\n".join(lines).rstrip() + "\n", files


def _section(section: Section, level: int, names: dict[int, str], folder: str) -> list[str]:
    lines = ["#" * level + " " + section.title, ""]
    for block in section.blocks:
        lines += [*_block(block, names, folder), ""]
    for sub in section.subsections:
        lines += _section(sub, min(level + 1, 6), names, folder)
    return lines


def _block(block: Block, names: dict[int, str], folder: str) -> list[str]:
    if isinstance(block, Paragraph):
        return [f"> {block.text}" if block.emphasis else block.text]
    if isinstance(block, Bullets):
        return [f"- {item}" for item in block.items]
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Figure):
        return [f"![{block.caption}]({folder}/{names[id(block)]})", "", f"*{block.caption}*"]
    if isinstance(block, Code):
        fence = "````" if "```" in block.text else "```"
        summary = [f"{block.summary}:", ""] if block.summary else []
        return [*summary, fence, block.text.rstrip("\n"), fence]
    raise TypeError(f"unknown block {type(block).__name__}")


def _cell(text: str) -> str:
    """Pipes would end the cell (group names hold one); line breaks would end the row."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _table(table: Table) -> list[str]:
    caption = [f"*{table.caption}*", ""] if table.caption else []
    head = "| " + " | ".join(_cell(c) for c in table.columns) + " |"
    rule = (
        "|"
        + "|".join("---:" if table.is_numeric(i) else "---" for i in range(len(table.columns)))
        + "|"
    )
    rows = ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
    return [*caption, head, rule, *rows]
