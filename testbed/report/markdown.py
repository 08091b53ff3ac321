"""Render a report :class:`~testbed.report.doc.Document` as Markdown (GitHub flavour).

Images are linked by file name: ``report.md`` sits next to its PNGs in the report
directory, so it renders in any Markdown viewer opened there (and on GitHub).
"""
from .doc import Figure, Note, Table


def _cell(c):
    return str(c).replace("|", "\\|").replace("\n", " ")


def _table(t):
    lines = []
    if t.caption:
        lines += [f"*{t.caption}*", ""]
    lines.append("| " + " | ".join(_cell(c) for c in t.columns) + " |")
    lines.append("|" + "|".join("---" for _ in t.columns) + "|")
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def _block(b):
    if isinstance(b, Table):
        return _table(b)
    if isinstance(b, Figure):
        return f"![{b.caption or b.path.stem}]({b.path.name})\n\n*{b.caption}*" if b.caption \
            else f"![{b.path.stem}]({b.path.name})"
    if isinstance(b, Note):
        return f"> **Note:** {b.text}"
    return str(b)


def render_markdown(doc):
    """The document as a Markdown string."""
    out = [f"# {doc.title}", "", doc.subtitle, ""]
    out += [f"- [{s.title}](#{s.anchor})" for s in doc.sections] + [""]
    for s in doc.sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            out += [_block(b), ""]
    return "\n".join(out)
