"""The report as a document: sections of paragraphs, tables and figures.

The section builders produce these plain objects; :mod:`testbed.report.html` and
:mod:`testbed.report.markdown` render the same document two ways, so both outputs
always say the same thing.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path

from testbed.errors import fmt_bytes


@dataclass
class Table:
    """Column titles and rows of already-formatted cells (strings); ``collapsed`` tables
    are folded away in HTML (a long reference table under a short summary)."""

    columns: list
    rows: list
    caption: str = ""
    collapsed: bool = False


# A table of more columns is split (see split_columns): with ~8 characters a cell, about 1000 px.
MAX_COLUMNS = 9


def split_columns(table, keys=1, max_columns=MAX_COLUMNS):
    """``table`` as tables of at most ``max_columns`` columns each (as even as can be), every
    one repeating the first ``keys`` columns (what a row is about), so a wide record still
    fits the page."""
    n = len(table.columns)
    if n <= max_columns:
        return [table]
    parts = -(-(n - keys) // max(1, max_columns - keys))
    size = -(-(n - keys) // parts)
    out = []
    for start in range(keys, n, size):
        cols = list(range(keys)) + list(range(start, min(n, start + size)))
        part = f"columns {cols[keys] + 1}–{cols[-1] + 1} of {n}"
        out.append(Table([table.columns[i] for i in cols], [[row[i] for i in cols] for row in table.rows],
                         caption=f"{table.caption} ({part})" if table.caption else part,
                         collapsed=table.collapsed))
    return out


@dataclass
class Figure:
    """A PNG written into the report directory."""

    path: Path
    caption: str = ""


@dataclass
class Note:
    """A short remark shown apart from the text, e.g. "not run"."""

    text: str


@dataclass
class Section:
    """A titled part of the report; ``blocks`` are str paragraphs, Tables, Figures, Notes."""

    title: str
    blocks: list = field(default_factory=list)

    @property
    def anchor(self):
        """GitHub's heading anchor: lower case, punctuation dropped, spaces as hyphens."""
        kept = "".join(c for c in self.title.lower() if c.isalnum() or c in " -")
        return kept.replace(" ", "-")

    def add(self, *blocks):
        self.blocks.extend(b for b in blocks if b is not None)
        return self


@dataclass
class Document:
    title: str
    subtitle: str = ""
    sections: list = field(default_factory=list)


def fmt_num(v, digits=4):
    """A number for a table cell: ints as they are, floats to ``digits`` significant
    digits, None/NaN as '-', infinities as '∞'."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        return f"{v:.{digits}g}"
    return str(v)


def fmt_cell(v):
    """Any scenario/record value as a short cell: lists and dicts inline."""
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt_cell(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {fmt_cell(x)}" for k, x in v.items()) + "}"
    return fmt_num(v)


def fmt_time(stamp):
    """An ISO time stamp as '2026-01-02 13:53:02+00:00' (a space, so a narrow cell can wrap
    it); '-' when absent."""
    return str(stamp).replace("T", " ", 1) if stamp else "-"


def fmt_size(n):
    return "-" if n is None else fmt_bytes(n)


def flatten(data, prefix=""):
    """{'a': {'b': 1}, 'l': [{'c': 2}]} -> [('a.b', 1), ('l.0.c', 2)], in the mapping's
    order; lists of scalars (and empty containers) stay values."""
    out = []
    for k, v in (data or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            v = {str(i): x for i, x in enumerate(v)}
        if isinstance(v, dict) and v:
            out += flatten(v, key + ".")
        else:
            out.append((key, v))
    return out
