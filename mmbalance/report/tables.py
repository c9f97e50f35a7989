"""One table writer for every table mmbalance prints or publishes: Markdown, HTML and text.

A :class:`Table` is columns (a human-readable title, an alignment, whether the column is
essential, a short title for narrow terminals, a one-line help) and rows of already formatted
cells. Cells and notes may use two bits of inline Markdown, ``**bold**`` and ```code```: the
Markdown writer keeps them, the HTML writer turns them into ``<strong>``/``<code>`` (so
backticks never show literally), the text writer drops the marks.

The text writer fits a width (80 columns unless told otherwise, on a terminal or not): column
headers wrap onto several lines, left-aligned text columns may wrap, and when that is not
enough the non-essential columns are dropped from the right, with a last line naming them.
Numbers are never cut ("0.8805…" says nothing).
"""

from __future__ import annotations

import html
import re
import shutil
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

#: Width of text tables when the output is not a terminal (a log file, a pipe).
TEXT_WIDTH = 80
#: Spaces between two columns of a text table.
GAP = 2
#: Narrowest a wrapping text column is made before columns are dropped instead.
MIN_WRAP = 12


@dataclass(frozen=True)
class Column:
    """A column: its title, alignment and whether it survives in a narrow terminal."""

    title: str
    align: Literal["left", "right"] = "right"
    essential: bool = False
    #: title in text tables (narrow terminals); defaults to ``title``
    short: str | None = None
    #: one line saying what the column holds (HTML tooltip)
    help: str = ""
    #: cells may wrap (long text such as a method's options); numbers never do
    wrap: bool = False


@dataclass
class Table:
    """Columns, rows of formatted cells, an optional title and notes printed under it."""

    columns: list[Column]
    rows: list[list[str]]
    title: str = ""
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(f"row {row!r} has {len(row)} cells for {len(self.columns)}")


# --- inline marks --------------------------------------------------------------------------------
_MARK = re.compile(r"(\*\*.+?\*\*|`[^`]+`)")


def plain(text: str) -> str:
    """``text`` without its inline marks (``**bold**`` and ```code``` become their content)."""
    return _MARK.sub(lambda m: m.group(0).strip("*`"), text)


def inline_html(text: str) -> str:
    """``text`` as HTML: ``**bold**`` -> ``<strong>``, ```code``` -> ``<code>``, the rest
    escaped."""
    parts = []
    for i, piece in enumerate(_MARK.split(text)):
        if i % 2 == 0:
            parts.append(html.escape(piece))
        elif piece.startswith("**"):
            parts.append(f"<strong>{html.escape(piece[2:-2])}</strong>")
        else:
            parts.append(f"<code>{html.escape(piece[1:-1])}</code>")
    return "".join(parts)


# --- Markdown ------------------------------------------------------------------------------------
#: What Markdown (or GitHub's math) would read as markup in a line of text: a backslash (which
#: escapes), code and emphasis marks, table cells, math; a ``]`` that closes a link, an image or
#: a link definition (followed by ``(``, ``[`` or ``:``); raw HTML and autolinks (``<`` before a
#: letter, ``/``, ``!`` or ``?``); character references (``&`` before a letter or ``#``).
_MD_SPECIAL = re.compile(r"[\\`*|$]|\](?=[(\[:])|<(?=[A-Za-z/!?])|&(?=[A-Za-z#])")


def md_text(text: str) -> str:
    """``text`` as literal Markdown: everything that could start markup is escaped with a
    backslash (see :data:`_MD_SPECIAL`), and line breaks become spaces, so that a label, a file
    name or a value from a config never becomes a link, an image, HTML, code or a new block;
    text that cannot (``mmpareto[latent]``, ``<0.001``) is left as it reads."""
    return _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), " ".join(text.splitlines()))


def md_code(text: str, table: bool = False) -> str:
    """``text`` as a Markdown code span whose fence is longer than any run of backticks in it
    (a code span's content is never markup); ``table``: inside a table cell, where ``|``
    must still be escaped."""
    text = " ".join(text.splitlines())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    if table:
        text = text.replace("|", "\\|")
    return f"{fence}{pad}{text}{pad}{fence}"


def md_inline(text: str, table: bool = False) -> str:
    """``text`` with its inline marks (``**bold**``, ```code```) as Markdown and everything
    else escaped (:func:`md_text`), so the user's strings in it (method labels, option values,
    names read from files) are shown as written and never as markup."""
    parts = []
    for i, piece in enumerate(_MARK.split(text)):
        if i % 2 == 0:
            parts.append(md_text(piece))
        elif piece.startswith("**"):
            parts.append(f"**{md_text(piece[2:-2])}**")
        else:
            parts.append(md_code(piece[1:-1], table))
    return "".join(parts)


def to_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table (title as a bold line above it, notes below); every
    cell, title and note goes through :func:`md_inline`."""
    lines = [f"**{md_inline(table.title)}**", ""] if table.title else []
    lines.append("| " + " | ".join(md_inline(c.title, True) for c in table.columns) + " |")
    lines.append("|" + "".join("---:|" if c.align == "right" else "---|" for c in table.columns))
    lines += ["| " + " | ".join(md_inline(cell, True) for cell in row) + " |" for row in table.rows]
    if table.notes:
        lines += ["", *(f"{md_inline(n)}\n" for n in table.notes)]
        lines[-1] = lines[-1].rstrip("\n")
    return "\n".join(lines)


# --- HTML ----------------------------------------------------------------------------------------
#: Styles of :func:`to_html` tables: cells never wrap (except ``wrap`` columns), headers do.
HTML_STYLE = (
    "table.data{border-collapse:collapse;font-size:13px;margin:0.4em 0 0.8em}"
    "table.data caption{text-align:left;font-weight:bold;padding:0 0 0.3em}"
    "table.data th,table.data td{border:1px solid #c8c8c8;padding:3px 7px}"
    "table.data th{background:#eee;font-weight:600;vertical-align:bottom;text-align:center}"
    "table.data td{white-space:nowrap;text-align:right;font-variant-numeric:tabular-nums}"
    "table.data td.left{text-align:left;white-space:normal;overflow-wrap:anywhere;max-width:18em}"
    "table.data td.wrap{white-space:normal;text-align:left;min-width:14em;max-width:36em}"
    "table.data tbody tr:nth-child(even){background:#fafafa}"
    "p.table-note{font-size:13px;color:#333;margin:0.2em 0}"
)


def to_html(table: Table, table_id: str | None = None) -> str:
    """An HTML table (class ``data``; styles in :data:`HTML_STYLE`), its notes as paragraphs."""
    ident = f' id="{html.escape(table_id)}"' if table_id else ""
    parts = [f'<table class="data"{ident}>']
    if table.title:
        parts.append(f"<caption>{inline_html(table.title)}</caption>")
    heads = []
    for c in table.columns:
        tip = f' title="{html.escape(c.help)}"' if c.help else ""
        heads.append(f"<th{tip}>{inline_html(c.title)}</th>")
    parts.append("<thead><tr>" + "".join(heads) + "</tr></thead><tbody>")
    for row in table.rows:
        cells = []
        for c, cell in zip(table.columns, row, strict=True):
            kind = "wrap" if c.wrap else ("left" if c.align == "left" else "")
            cls = f' class="{kind}"' if kind else ""
            cells.append(f"<td{cls}>{inline_html(cell)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    parts += [f'<p class="table-note">{inline_html(n)}</p>' for n in table.notes]
    return "\n".join(parts)


# --- text ----------------------------------------------------------------------------------------
def terminal_width() -> int:
    """The terminal's width when stdout is one, else :data:`TEXT_WIDTH` (batch logs)."""
    if sys.stdout.isatty():
        return shutil.get_terminal_size((TEXT_WIDTH, 24)).columns
    return TEXT_WIDTH


def _title(column: Column) -> str:
    return column.short or column.title


def _cell_width(column: Column, cells: Sequence[str]) -> int:
    """Widest cell, and at least the longest word of the title (titles may wrap)."""
    words = max((len(w) for w in _title(column).split()), default=0)
    return max([words, *(len(c) for c in cells)])


def wrap_text(text: str, width: int) -> list[str]:
    """Lines of at most ``width`` characters: broken at spaces, else after ``[``, ``,`` or
    ``=`` (method variants such as ``mcr[strategy=independent]``), else anywhere."""
    lines = []
    for line in textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False) or [""]:
        while len(line) > width:
            cut = max(line.rfind(c, 0, width) for c in "[,=") + 1 or width
            lines.append(line[:cut])
            line = line[cut:]
        lines.append(line)
    return lines


def to_text(table: Table, width: int | None = None) -> str:
    """A plain-text table that fits ``width`` columns (default :func:`terminal_width`)."""
    width = width or terminal_width()
    cells = [[plain(cell) for cell in row] for row in table.rows]
    keep = list(range(len(table.columns)))
    tight = {i: _cell_width(table.columns[i], [r[i] for r in cells]) for i in keep}
    widths = {i: max(tight[i], len(_title(table.columns[i]))) for i in keep}

    def total() -> int:
        return sum(widths[i] for i in keep) + GAP * (len(keep) - 1)

    if total() > width:  # titles wrap onto several lines before anything else gives way
        widths = dict(tight)

    def shrink(i: int, floor: int) -> None:
        widths[i] = max(floor, widths[i] - (total() - width))

    # long text (``wrap`` columns) wraps first; then the non-essential columns go, from the
    # right; then left-aligned columns (method names) wrap, at a word or a bracket if they can
    for i in keep:
        if total() > width and table.columns[i].wrap:
            shrink(i, max(MIN_WRAP, max((len(w) for r in cells for w in r[i].split()), default=0)))
    dropped: list[int] = []
    for i in reversed(range(len(table.columns))):
        if total() <= width:
            break
        if not table.columns[i].essential:
            keep.remove(i)
            dropped.append(i)
    for i in keep:
        if total() > width and table.columns[i].align == "left":
            shrink(i, MIN_WRAP)

    def line(parts: list[list[str]]) -> list[str]:
        height = max(len(p) for p in parts)
        out = []
        for k in range(height):
            pieces = []
            for i, p in zip(keep, parts, strict=True):
                text = p[k] if k < len(p) else ""
                pad = text.rjust if table.columns[i].align == "right" else text.ljust
                pieces.append(pad(widths[i]))
            out.append((" " * GAP).join(pieces).rstrip())
        return out

    lines = []
    if table.title:
        lines += wrap_text(plain(table.title), width)
    header = [wrap_text(_title(table.columns[i]), widths[i]) for i in keep]
    height = max(len(h) for h in header)
    header = [[""] * (height - len(h)) + h for h in header]  # titles sit on the rule
    lines += line(header)
    lines.append("─" * min(total(), width))
    for row in cells:
        lines += line([wrap_text(row[i], widths[i]) for i in keep])
    for note in table.notes:
        lines += wrap_text(plain(note), width)
    if dropped:
        names = ", ".join(_title(table.columns[i]) for i in dropped[::-1])
        lines += wrap_text(f"Left out to fit {width} columns: {names}.", width)
    return "\n".join(lines)
