"""Render a :class:`~unshortcut.report.document.Document` as one self-contained HTML page.

Images are embedded as base64 PNG data, the style sheet is inline and there is no
script, so the file opens anywhere (e-mail, an offline laptop, an archive) and shows
the same thing. Every text goes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
from html import escape

from unshortcut.report.document import (
    Block,
    Bullets,
    Code,
    Document,
    Figure,
    Paragraph,
    Section,
    Table,
)

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
       max-width: 1100px; margin: 2rem auto; padding: 0 1rem; color: #1d232a; line-height: 1.45; }
h1 { font-size: 1.7rem; margin-bottom: 0.2rem; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 0.2rem; margin-top: 2.2rem; }
h3 { margin-top: 1.6rem; }
.subtitle { color: #57606a; margin-top: 0; }
nav ol { columns: 2; color: #57606a; }
table { border-collapse: collapse; margin: 0.6rem 0 1rem; font-size: 0.92rem; }
caption { caption-side: top; text-align: left; color: #57606a; padding-bottom: 0.3rem; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.6rem; vertical-align: top; }
th { background: #f6f8fa; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.callout { border-left: 4px solid #bf8700; background: #fff8c5; padding: 0.5rem 0.8rem; }
figure { margin: 0.8rem 0 1.4rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: 0.9rem; }
pre { background: #f6f8fa; padding: 0.7rem; overflow-x: auto; font-size: 0.85rem; }
details summary { cursor: pointer; color: #0969da; }
"""


def render_html(document: Document) -> str:
    """The whole page as a string."""
    toc = "".join(
        f'<li><a href="#{s.anchor}">{escape(s.title)}</a></li>' for s in document.sections
    )
    body = "".join(_section(s, 2) for s in document.sections)
    subtitle = f'<p class="subtitle">{escape(document.subtitle)}</p>' if document.subtitle else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(document.title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{escape(document.title)}</h1>\n{subtitle}\n"
        f"<nav><ol>{toc}</ol></nav>\n{body}</body>\n</html>\n"
    )


def _section(section: Section, level: int) -> str:
    heading = f'<h{level} id="{section.anchor}">{escape(section.title)}</h{level}>\n'
    blocks = "".join(_block(b) for b in section.blocks)
    subsections = "".join(_section(s, min(level + 1, 6)) for s in section.subsections)
    return f"<section>\n{heading}{blocks}{subsections}</section>\n"


def _block(block: Block) -> str:
    if isinstance(block, Paragraph):
        css = ' class="callout"' if block.emphasis else ""
        return f"<p{css}>{escape(block.text)}</p>\n"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{escape(i)}</li>" for i in block.items) + "</ul>\n"
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Figure):
        data = base64.b64encode(block.png).decode("ascii")
        return (
            f'<figure><img src="data:image/png;base64,{data}" alt="{escape(block.caption)}">'
            f"<figcaption>{escape(block.caption)}</figcaption></figure>\n"
        )
    if isinstance(block, Code):
        pre = f"<pre>{escape(block.text)}</pre>"
        if block.summary:
            return f"<details><summary>{escape(block.summary)}</summary>{pre}</details>\n"
        return pre + "\n"
    raise TypeError(f"unknown block {type(block).__name__}")


def _table(table: Table) -> str:
    caption = f"<caption>{escape(table.caption)}</caption>" if table.caption else ""
    head = "".join(f"<th>{escape(c)}</th>" for c in table.columns)
    rows = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{escape(cell)}</td>'
            if table.is_numeric(i)
            else f"<td>{escape(cell)}</td>"
            for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in table.rows
    )
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>\n"
