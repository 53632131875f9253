"""``report.html``: the report's markdown as one self-contained page that opens offline.

The report's markdown uses a small subset (``#`` headings, ``- `` bullets, ``|`` tables, ``![alt](file)``
images, paragraphs), so it is converted here rather than with a markdown package: every plot is embedded as
a base64 ``data:`` URI, the style sheet is inline, and the page loads nothing from the network (no external
CSS, JS or fonts), so it shows the same on a cluster without internet.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)]+)\)$")

STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th { background: #eee; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 1em 0; }
"""


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _inline(text: str) -> str:
    """Escape, then the one inline markup the report uses: ``code``."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _image(alt: str, src: str, base: Path) -> str:
    data = base64.b64encode((base / src).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def markdown_to_html(lines: list[str], base: Path, title: str) -> str:
    """The page for the report's markdown ``lines``; image paths are read relative to ``base``."""
    body: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line:
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            head, rows = _cells(block[0]), [_cells(r) for r in block[2:]]
            body.append("<table>")
            body.append("<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>")
            body += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows]
            body.append("</table>")
        elif line.startswith("- "):
            body.append("<ul>")
            while i < len(lines) and lines[i].startswith("- "):
                body.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            body.append("</ul>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
            i += 1
        elif m := IMAGE.match(line):
            body.append(_image(m["alt"], m["src"], base))
            i += 1
        else:
            body.append(f"<p>{_inline(line)}</p>")
            i += 1
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
