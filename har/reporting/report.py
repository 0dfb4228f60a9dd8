"""Writing the reports of the pipeline grid into a folder: Tables I-V built as data (`har.reporting.tables`),
rendered in each format (`har.reporting.render`), and the fidelity report beside them (`har.reporting.fidelity`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from har.atomic import atomic_write_text
from har.published import PaperValue
from har.reporting.fidelity import write_fidelity
from har.reporting.render import to_csv, to_latex, to_markdown
from har.reporting.tables import make_tables


def build_tables(df: pd.DataFrame, cfg: dict, selected: dict, published: list[PaperValue],
                 out_dir: str | Path) -> list[Path]:
    """Write `table_<id>.csv`, `.md` and `.tex` for each of Tables I-V and `fidelity.md` / `.csv`; return the
    paths."""
    out_dir = Path(out_dir)
    tables = make_tables(df, cfg, selected, published)
    paths = []
    for table in tables:
        for suffix, render in ((".csv", to_csv), (".md", to_markdown), (".tex", to_latex)):
            path = out_dir / f"table_{table.id}{suffix}"
            atomic_write_text(path, render(table))
            paths.append(path)
    return paths + write_fidelity(tables, df, cfg, published, out_dir)
