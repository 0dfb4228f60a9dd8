"""Rendering a table built by `har.reporting.tables` (data: columns, rows, caption, notes) as Markdown, LaTeX or
CSV text; building and rendering stay apart, so the fidelity report and the cost table render with the same rows."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from har.reporting.tables import Section, Table


def markdown_row(cells: list[str]) -> str:
    """One row of a Markdown table (pipes inside a cell escaped)."""
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def to_markdown(table: Table) -> str:
    align = ["---" if i < table.labels else "---:" for i in range(len(table.columns))]
    lines = [f"**Table {table.id}.** {table.caption}", "", markdown_row(table.columns), markdown_row(align)]
    notes = ["", *table.notes] if table.notes else []
    return "\n".join(lines + [markdown_row(r) for r in table.rows] + notes) + "\n"


def sections_to_markdown(heading: str, caption: str, sections: Sequence[Section]) -> str:
    """A report of titled tables under one heading and caption (the fidelity report)."""
    out = [f"**{heading}.** {caption}"]
    for section in sections:
        out += ["", f"**{section.title}**", ""]
        if not section.rows:
            out.append(section.empty)
            continue
        out += [markdown_row(section.columns), markdown_row(["---:" if n else "---" for n in section.numeric])]
        out += [markdown_row(row) for row in section.rows]
    return "\n".join(out) + "\n"


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$",
          "<": "$<$", ">": "$>$"}


def _tex(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
    """A booktabs tabular in a table float (needs \\usepackage{booktabs})."""
    spec = "l" * table.labels + "r" * (len(table.columns) - table.labels)
    body = [" & ".join(_tex(c) for c in row) + r" \\" for row in table.rows]
    return "\n".join([r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{_tex(table.caption)}}}",
                      rf"\label{{tab:har-{table.id}}}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
                      " & ".join(_tex(c) for c in table.columns) + r" \\", r"\midrule", *body, r"\bottomrule",
                      r"\end{tabular}", *[rf"\par\footnotesize {_tex(note)}" for note in table.notes],
                      r"\end{table}"]) + "\n"


def to_csv(table: Table) -> str:
    """The cells as CSV between a `# caption` line and `# note` lines (read back with
    `pandas.read_csv(path, comment="#")`)."""
    cells = pd.DataFrame(table.rows, columns=table.columns)
    notes = "".join(f"# {note}\n" for note in table.notes)
    return f"# Table {table.id}. {table.caption}\n" + cells.to_csv(index=False) + notes
