"""Render a report :class:`~testbed.report.doc.Document` as one self-contained HTML page.

Images are embedded as base64 ``data:`` URIs and the style sheet is inline, so the page
opens offline, from anywhere, and can be mailed as one file; there is no JavaScript.
"""
import base64
import html
import re

from .doc import Figure, Note, Table

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif;
       margin: 0 auto; max-width: 1180px; padding: 16px 28px 48px; color: #1d1d1f; line-height: 1.4; }
h1 { font-size: 1.7em; margin-bottom: 0.1em; }
h2 { font-size: 1.3em; border-bottom: 2px solid #e3e3e8; padding-bottom: 4px; margin-top: 1.8em; }
.subtitle { color: #666; margin-top: 0; }
nav { background: #f5f5f7; padding: 8px 14px; border-radius: 6px; font-size: 0.92em; }
nav a { margin-right: 14px; color: #0a58ca; text-decoration: none; }
table { border-collapse: collapse; margin: 10px 0 18px; font-size: 0.86em; max-width: 100%; }
th, td { border: 1px solid #d9d9de; padding: 3px 8px; vertical-align: top; }
/* a word longer than its cell (a path, a hash) breaks rather than pushing the table past the page */
td { overflow-wrap: break-word; }
th { background: #f0f0f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
caption { caption-side: top; text-align: left; color: #555; font-size: 0.95em; padding-bottom: 4px; }
figure { margin: 12px 0 22px; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e3e8; }
figcaption { color: #555; font-size: 0.9em; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 6px 10px; margin: 8px 0; }
details > summary { cursor: pointer; color: #0a58ca; margin: 6px 0; }
.scroll { overflow-x: auto; }
"""

_NUMERIC = re.compile(r"^[-+]?[\d.,]+(e[-+]?\d+)?\s*(%|s|B|KiB|MiB|GiB|TiB)?$|^[-∞]$|^∞$")


def data_uri(path):
    """A PNG file as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _table(t):
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in t.columns)
    body = []
    for row in t.rows:
        cells = []
        for c in row:
            c = str(c)
            cls = ' class="num"' if _NUMERIC.match(c.strip()) else ""
            cells.append(f"<td{cls}>{html.escape(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{html.escape(t.caption)}</caption>" if t.caption and not t.collapsed else ""
    out = (f'<div class="scroll"><table>{cap}<thead><tr>{head}</tr></thead>'
           f'<tbody>{"".join(body)}</tbody></table></div>')
    if t.collapsed:
        summary = html.escape(t.caption or "table")
        out = f"<details><summary>{summary} ({len(t.rows)} rows)</summary>{out}</details>"
    return out


def _block(b):
    if isinstance(b, Table):
        return _table(b)
    if isinstance(b, Figure):
        alt = html.escape(b.caption or b.path.stem)
        return (f'<figure><img src="{data_uri(b.path)}" alt="{alt}">'
                f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
    if isinstance(b, Note):
        return f'<div class="note">{html.escape(b.text)}</div>'
    return f"<p>{html.escape(str(b))}</p>"


def render_html(doc):
    """The document as an HTML string."""
    nav = "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in doc.sections)
    parts = [f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>'
             + "".join(_block(b) for b in s.blocks) + "</section>" for s in doc.sections]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            # an empty icon, so a browser asks for no favicon file
            "<link rel=\"icon\" href=\"data:,\">"
            f"<title>{html.escape(doc.title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(doc.title)}</h1><p class=\"subtitle\">{html.escape(doc.subtitle)}</p>"
            f"<nav>{nav}</nav>{''.join(parts)}</body></html>\n")
