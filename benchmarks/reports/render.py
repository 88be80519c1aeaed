"""The table model (cells with mean ± std, bold best) and its renderers: Markdown, LaTeX (booktabs), HTML."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from benchmarks.errors import UserError

MISSING = "—"


@dataclass
class Cell:
    """A number with an optional spread; `text` is set for non-numeric cells."""

    value: float | None = None
    std: float | None = None
    digits: int = 1
    bold: bool = False
    signed: bool = False
    text: str | None = None

    def plain(self, plus_minus: str = " ± ") -> str:
        if self.text is not None:
            return self.text
        if self.value is None or math.isnan(self.value):
            return MISSING
        number = f"{self.value:+.{self.digits}f}" if self.signed else f"{self.value:.{self.digits}f}"
        if self.std is not None and not math.isnan(self.std):
            number += f"{plus_minus}{self.std:.{self.digits}f}"
        return number

    @property
    def rounded(self) -> float | None:
        if self.text is not None or self.value is None or math.isnan(self.value):
            return None
        return round(self.value, self.digits)


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)
    align: str = ""
    """One letter per column (l/r); default: first column left, the rest right."""

    def alignment(self) -> str:
        return self.align or "l" + "r" * (len(self.header) - 1)


def text_cell(text: Any) -> Cell:
    return Cell(text=str(text))


def mark_best(table: Table, columns: Iterable[int]) -> None:
    """Bold the highest value of each given column; equal values at display precision tie. A column
    whose values all tie (a class every method misses, say) has no best and stays plain."""
    for col in columns:
        values = [row[col].rounded for row in table.rows if row[col].rounded is not None]
        if len(set(values)) < 2:
            continue
        best = max(values)
        for row in table.rows:
            row[col].bold = row[col].rounded == best


def render_markdown(table: Table) -> str:
    def fmt(cell: Cell) -> str:
        text = cell.plain().replace("|", "\\|")
        return f"**{text}**" if cell.bold else text

    align = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = [f"### {table.title}", ""]
    lines.append("| " + " | ".join(h.replace("|", "\\|") for h in table.header) + " |")
    lines.append("| " + " | ".join(align[a] for a in table.alignment()) + " |")
    lines.extend("| " + " | ".join(fmt(c) for c in row) + " |" for row in table.rows)
    if table.notes:
        lines.append("")
        lines.extend(table.notes)
    return "\n".join(lines) + "\n"


_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                   "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_SYMBOLS = {"→": r"$\rightarrow$", "·": r"$\cdot$", "Δ": r"$\Delta$", "—": "--", "−": "-", "±": r"$\pm$"}


def latex_escape(text: str) -> str:
    out = "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text)
    for symbol, command in _LATEX_SYMBOLS.items():
        out = out.replace(symbol, command)
    return out.replace("->", r"$\rightarrow$")


def render_latex(table: Table) -> str:
    def fmt(cell: Cell) -> str:
        text = latex_escape(cell.plain(plus_minus=" ± "))
        return rf"\textbf{{{text}}}" if cell.bold else text

    lines = [f"% {table.title}", r"% needs \usepackage{booktabs}",
             rf"\begin{{tabular}}{{{table.alignment()}}}", r"\toprule",
             " & ".join(latex_escape(h) for h in table.header) + r" \\", r"\midrule"]
    lines.extend(" & ".join(fmt(c) for c in row) + r" \\" for row in table.rows)
    lines.extend([r"\bottomrule", r"\end{tabular}"])
    lines.extend(f"% {note}" for note in table.notes)
    return "\n".join(lines) + "\n"


def render_html(table: Table) -> str:
    def fmt(cell: Cell, align: str) -> str:
        text = html.escape(cell.plain())
        style = ' class="num"' if align == "r" else ""
        return f"<td{style}><strong>{text}</strong></td>" if cell.bold else f"<td{style}>{text}</td>"

    align = table.alignment()
    parts = [f"<h3>{html.escape(table.title)}</h3>", "<table>", "<thead><tr>"]
    parts.extend(f"<th>{html.escape(h)}</th>" for h in table.header)
    parts.append("</tr></thead><tbody>")
    for row in table.rows:
        parts.append("<tr>" + "".join(fmt(c, align[i]) for i, c in enumerate(row)) + "</tr>")
    parts.append("</tbody></table>")
    if table.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in table.notes) + "</ul>")
    return "\n".join(parts) + "\n"


RENDERERS = {"markdown": render_markdown, "latex": render_latex, "html": render_html}


def render(tables: list[Table], fmt: str = "markdown") -> str:
    if fmt not in RENDERERS:
        raise UserError(f"unknown table format {fmt!r}; valid: {', '.join(RENDERERS)} (csv is written from the frames)")
    return "\n".join(RENDERERS[fmt](t) for t in tables)
