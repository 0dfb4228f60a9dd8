"""Which of a table's published cells the grid trains, and why it does not train the others: a note under each table.

A published value is trained when the grid plans the runs of its line: the split and method (Table I: and t point;
Table V: layout variant) among the runs whose lines the table shows (`grid.run_tables`). Otherwise the first reason
that applies is given (the dataset or ratio is not in the config, the dataset does not serve the table, the method
is not trained or does not list the table, the t point or layout is not in the grid), with the paper's source when
it copied the row instead of training it.
"""

from __future__ import annotations

from collections.abc import Sequence

from har.pipeline import grid
from har.published import PaperValue

Row = tuple[str, str]  # (split, the row's label as the paper prints it, with its t or layout)


def planned_lines(cfg: dict) -> set[tuple[str, str, str, str]]:
    """(table, split, method, t point as text) of every line the grid's runs give."""
    return {(table, spec.split, spec.method, "" if spec.t_point is None else f"{spec.t_point:g}")
            for spec in grid.final_runs(cfg) + grid.tsearch_runs(cfg) for table in grid.run_tables(cfg, spec)}


def _split(value: PaperValue) -> str:
    return grid.split_name(value.dataset, value.ratio)


def _label(value: PaperValue) -> str:
    t = f" t={value.t_point:g}" if value.t_point is not None else ""
    layout = f" [{value.method.partition('@')[2]}]" if "@" in value.method else ""
    return f"{value.label}{t}{layout}"


def untrained_reason(cfg: dict, value: PaperValue) -> str:
    """Why the grid plans no run behind a published value that `planned_lines` lacks."""
    names = [entry["name"] for entry in cfg["datasets"]]
    base, _, layout = value.method.partition("@")
    method = cfg["methods"].get(base)
    if value.dataset not in names:
        return f"{value.dataset} is not among this config's datasets"
    if value.ratio is not None and _split(value) not in {grid.split_name(d, r) for d, r in grid.splits(cfg)}:
        return f"ratio {value.ratio:g} is not among this config's {value.dataset} ratios"
    served = grid.layout_datasets(cfg) if value.table == "V" else \
        [d for d in names if value.table in grid.dataset_tables(cfg, d)]
    if value.dataset not in served:
        return f"{value.dataset} does not serve Table {value.table} in this config"
    if method is None:
        return f"{base} is not a method of this config"
    if not method.get("trainable", True):
        return f"{base} has trainable: false"
    if value.table == "I":
        kind = method.get("t_search")
        if not kind:
            return f"{base} has no t line search"
        return f"t={value.t_point:g} is not in t_search.{kind}"
    if value.table == "V":
        return f"layout {layout} of {base} is not in this config's layouts"
    return f"{base} does not list Table {value.table}"


def coverage_note(cfg: dict, published: Sequence[PaperValue], table_id: str) -> str:
    """One note: how many of the table's published values the grid trains, and each untrained row with why."""
    values = [v for v in published if v.table == table_id]
    if not values:
        return f"Published cells: the paper prints no value in Table {table_id}."
    planned = planned_lines(cfg)
    rows_of: dict[str, dict[str, None]] = {}  # split -> its published rows, in order
    why: dict[str, dict[Row, None]] = {}  # reason -> the rows it leaves untrained
    copied: dict[str, dict[str, None]] = {}  # source -> the untrained rows the paper copied from it
    trained = 0
    for v in values:
        rows_of.setdefault(_split(v), {})[_label(v)] = None
        if (v.table, _split(v), v.method, "" if v.t_point is None else f"{v.t_point:g}") in planned:
            trained += 1
            continue
        why.setdefault(untrained_reason(cfg, v), {})[(_split(v), _label(v))] = None
        if v.copied_from:
            copied.setdefault(v.copied_from, {})[v.label] = None
    text = f"Published cells: this grid trains the runs behind {trained} of the paper's {len(values)} values."
    for reason, rows in why.items():
        text += f" Not trained ({reason}): {_rows_text(rows, rows_of)}."
    for source, labels in copied.items():
        text += f" Of these, the paper copied {', '.join(labels)} from {source} instead of training them."
    return text


def _rows_text(rows: dict[Row, None], rows_of: dict[str, dict[str, None]]) -> str:
    """'split (all its N rows)' where every published row of a split is listed, else 'split: label, label'."""
    parts = []
    for split in dict.fromkeys(split for split, _ in rows):
        labels = [label for s, label in rows if s == split]
        whole = len(labels) > 1 and len(labels) == len(rows_of[split])
        parts.append(f"{split} (all its {len(labels)} rows)" if whole else f"{split}: {', '.join(labels)}")
    return "; ".join(parts)
