"""The paper's Tables I-V from the run results, as CSV, Markdown and LaTeX, beside the published numbers.

Markdown and LaTeX are written here rather than by pandas, which would need tabulate and jinja2 for them.
Every caption carries the config label, so a quick run can never pass for the paper's setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd
import yaml

from har.atomic import atomic_write_text
from har.config import LossConfig
from har.pipeline import grid
from har.reporting.results import RESULT_COLUMNS, ResultError, setting_label, summarise

PUBLISHED_KEYS = ("table", "dataset", "ratio", "method", "metric", "value")


@dataclass(frozen=True)
class Table:
    """One table's cells as text; the first `labels` columns name the row, the others hold numbers."""

    id: str
    caption: str
    columns: list[str]
    rows: list[list[str]]
    labels: int


def load_published(path: str | Path | None = None) -> list[dict]:
    """The paper's numbers (`published.yaml` beside this module unless `path` is given), checked."""
    source = Path(path) if path else resources.files("har.reporting") / "published.yaml"
    facts = yaml.safe_load(source.read_text()) or []
    if not isinstance(facts, list):
        raise ResultError(f"{source}: expected a list of {{{', '.join(PUBLISHED_KEYS)}}} entries")
    for i, fact in enumerate(facts):
        if not isinstance(fact, dict) or sorted(fact) != sorted(PUBLISHED_KEYS):
            raise ResultError(f"{source}: entry {i} ({fact!r}) must have exactly the keys {list(PUBLISHED_KEYS)}")
        if fact["table"] not in grid.TABLES or not isinstance(fact["value"], (int, float)):
            raise ResultError(f"{source}: entry {i} needs a table among {list(grid.TABLES)} and a numeric value")
    return facts


def _fact(published: list[dict], table: str, dataset: str, ratio: float, method: str, metric: str) -> float | None:
    for f in published:
        if (str(f["table"]), f["dataset"], float(f["ratio"]), f["method"], f["metric"]) == \
                (table, dataset, float(ratio), method, metric):
            return float(f["value"])
    return None


def _cell(stats: pd.Series | None, metric: str, seeds: int) -> str:
    """`mean ± std` in percent; `(n=k)` flags a cell with fewer runs than seeds (std needs two)."""
    if stats is None or not stats[f"{metric}_n"] or math.isnan(stats[f"{metric}_mean"]):
        return "-"
    n = int(stats[f"{metric}_n"])
    text = f"{100 * stats[f'{metric}_mean']:.1f}"
    if n > 1:
        text += f" ± {100 * stats[f'{metric}_std']:.1f}"
    return text if n == seeds else f"{text} (n={n})"


def _with_paper(stats: pd.Series | None, metric: str, fact: float | None) -> list[str]:
    """The `paper` and `diff` (ours - paper, percentage points) cells."""
    if fact is None:
        return ["-", "-"]
    ours = "-" if stats is None or not stats[f"{metric}_n"] else f"{100 * stats[f'{metric}_mean'] - fact:+.1f}"
    return [f"{fact:.1f}", ours]


def _index(summary: pd.DataFrame, keys: list[str]) -> dict[tuple, pd.Series]:
    return {tuple(row[k] for k in keys): row for _, row in summary.iterrows()}


def _is_har(df: pd.DataFrame, cfg: dict, method: str) -> bool:
    """From the runs' own configs; for a method without runs, from its config fields (package default: HAR)."""
    runs = df[df["method"] == method]
    if len(runs):
        return bool(runs["har"].all())
    spec = cfg["methods"][method]
    if not spec.get("trainable", True):
        return False
    loss = {**spec.get("run", {}).get("loss", {}), **(cfg.get("run_overrides") or {}).get("loss", {})}
    return bool(loss.get("har", LossConfig.har))


def _note(table_id: str, caption: str, text: str) -> Table:
    return Table(table_id, caption, ["Note"], [[text]], 1)


def _metric_columns(rows: list[list[str]], columns: list[str], header: str, keys: list[tuple | None],
                    stats: dict[tuple, pd.Series], metric: str, seeds: int, facts: list[float | None]) -> None:
    """Append one metric column to every row, with paper / diff columns when any row has a published value."""
    columns.append(header)
    paper = any(f is not None for f in facts)
    if paper:
        columns += [f"{header} paper", f"{header} diff"]
    for row, key, fact in zip(rows, keys, facts):
        row.append(_cell(stats.get(key), metric, seeds))
        if paper:
            row += _with_paper(stats.get(key), metric, fact)


def _splits(cfg: dict, table_id: str) -> list[tuple[str, float, str]]:
    """(dataset, ratio, split name) of the splits a table reports: the datasets serving it (Table V: those of
    the layout variants)."""
    if table_id == "V":
        datasets = set(grid.layout_datasets(cfg))
        pairs = [(d, r) for d, r in grid.splits(cfg) if d in datasets]
    else:
        pairs = grid.splits(cfg, table_id)
    return [(d, r, grid.split_name(d, r)) for d, r in pairs]


def _display(cfg: dict, method: str) -> str:
    return cfg["methods"][method].get("display", method)


def table_search(df: pd.DataFrame, cfg: dict, selected: dict, caption: str) -> Table:
    """Table I: validation and test top-1 of every t of the line search; the t chosen on validation marked."""
    search = cfg["t_search"]
    units = search.get("per_class_units") or {}
    runs = df[df["role"] == "tsearch"]
    keys = [(split, m, float(t)) for _, _, split in _splits(cfg, "I") for m in grid.searched_methods(cfg)
            for t in search[cfg["methods"][m]["t_search"]]]
    if not keys:
        return _note("I", caption, "no method of this config has a t line search")
    stats = _index(summarise(runs, ["split", "method", "t_point"], ("val_top1", "top1", "train_threshold")),
                   ["split", "method", "t_point"])
    rows = []
    for split, m, t in keys:
        chosen = (selected.get(split) or {}).get(m) or {}
        mark = "yes" if chosen.get("t_point") is not None and math.isclose(chosen["t_point"], t) else ""
        t_text = f"{t:g}"
        if units.get(cfg["methods"][m]["t_search"]) and (split, m, t) in stats:
            t_text += f"/C ({stats[(split, m, t)]['train_threshold_mean']:.3g})"
        rows.append([split, _display(cfg, m), t_text, mark])
    columns = ["Split", "Method", "t", "Selected"]
    seeds = len(search["seeds"])
    for metric, header in (("val_top1", "val top-1"), ("top1", "test top-1")):
        _metric_columns(rows, columns, header, keys, stats, metric, seeds, [None] * len(keys))
    return Table("I", caption, columns, rows, 4)


def table_methods(df: pd.DataFrame, cfg: dict, published: list[dict], table_id: str, caption: str) -> Table:
    """Tables II and IV: one row per method, per split its test top-1, and dynamic top-1 / saving for HAR."""
    methods = [m for m, spec in cfg["methods"].items() if table_id in spec.get("tables", [])]
    if not methods:
        return _note(table_id, caption, f"no method of this config is listed for Table {table_id}")
    finals = df[(df["role"] == "final") & df["method"].isin(methods)]
    stats = _index(summarise(finals, ["split", "method"]), ["split", "method"])
    har = {m: _is_har(df, cfg, m) for m in methods}
    metrics = [("top1", "top-1")]
    if any(har.values()):
        metrics += [("dyn_top1", "dyn. top-1"), ("dyn_saving", "MACs saving")]
    columns, rows = ["Method"], [[_display(cfg, m)] for m in methods]
    for dataset, ratio, split in _splits(cfg, table_id):
        for metric, header in metrics:
            # Static methods have no exit threshold: their dynamic cells stay "-".
            keys = [(split, m) if metric == "top1" or har[m] else None for m in methods]
            facts = [_fact(published, table_id, dataset, ratio, m, metric) for m in methods]
            _metric_columns(rows, columns, f"{split} {header}", keys, stats, metric, len(cfg["seeds"]), facts)
    return Table(table_id, caption, columns, rows, 1)


def table_shots(df: pd.DataFrame, cfg: dict, published: list[dict], caption: str) -> Table:
    """Table III: many / medium / few-shot and overall top-1 per split and method."""
    methods = [m for m, spec in cfg["methods"].items() if "III" in spec.get("tables", [])]
    finals = df[(df["role"] == "final") & df["method"].isin(methods)]
    if finals.empty:
        return _note("III", caption, "no run of this config is listed for Table III (the paper's Table III is "
                                     "ImageNet-LT and iNaturalist 2018)")
    stats = _index(summarise(finals, ["split", "method"]), ["split", "method"])
    keys = [(split, m) for _, _, split in _splits(cfg, "III") for m in methods]
    splits = {split: (d, r) for d, r, split in _splits(cfg, "III")}
    columns, rows = ["Split", "Method"], [[split, _display(cfg, m)] for split, m in keys]
    for metric, header in (("many", "many"), ("medium", "medium"), ("few", "few"), ("top1", "all")):
        facts = [_fact(published, "III", *splits[split], m, metric) for split, m in keys]
        _metric_columns(rows, columns, header, keys, stats, metric, len(cfg["seeds"]), facts)
    return Table("III", caption, columns, rows, 2)


def table_layouts(df: pd.DataFrame, cfg: dict, published: list[dict], caption: str) -> Table:
    """Table V: the layout method with its default layout and each variant, static and dynamic."""
    method = (cfg.get("layouts") or {}).get("method")
    variants = [method] + grid.layout_variants(cfg) if method in grid.trainable_methods(cfg) else []
    finals = df[(df["role"] == "final") & df["method"].isin(variants)]
    if finals.empty:
        return _note("V", caption, "no exit layout runs in this config")
    stats = _index(summarise(finals, ["split", "method"], RESULT_COLUMNS + ("num_exits",)), ["split", "method"])
    layouts = dict(zip(finals["method"], finals["layout"].fillna("default")))
    keys = [(split, v) for _, _, split in _splits(cfg, "V") for v in variants]
    splits = {split: (d, r) for d, r, split in _splits(cfg, "V")}
    columns = ["Split", "Layout", "Exits"]
    rows = [[split, layouts.get(v, v.partition("@")[2] or "default"),
             f"{stats[(split, v)]['num_exits_mean']:.0f}" if (split, v) in stats else "-"] for split, v in keys]
    for metric, header in (("top1", "static top-1"), ("dyn_top1", "dyn. top-1"), ("dyn_saving", "MACs saving")):
        facts = [_fact(published, "V", *splits[split], v, metric) for split, v in keys]
        _metric_columns(rows, columns, header, keys, stats, metric, len(cfg["seeds"]), facts)
    return Table("V", caption, columns, rows, 3)


CAPTIONS = {
    "I": "Line search of the HAR training threshold t: validation and test top-1 (%) of each t; the t chosen "
         "on validation is marked (t/C: a grid in units of 1/C, the threshold in brackets).",
    "II": "CIFAR-LT: test top-1 (%) in static mode (bare backbone); for HAR methods also dynamic top-1 and MACs "
          "saving (%) at the exit threshold s chosen on validation. paper: published value; diff: ours - paper.",
    "III": "Test top-1 (%) on many- (> 100 training images), medium- (20-100) and few-shot (< 20) classes and "
           "overall.",
    "IV": "No re-weighting: test top-1 (%) in static mode; for HAR methods also dynamic top-1 and MACs saving (%) "
          "at the s chosen on validation.",
    "V": "Exit layouts (C stem, B block group, E exit): static test top-1, dynamic top-1 and MACs saving (%) at "
         "the s chosen on validation.",
}


def _caption(cfg: dict, table_id: str) -> str:
    seeds = len(cfg["t_search"]["seeds"]) if table_id == "I" else len(cfg["seeds"])
    return (f"{CAPTIONS[table_id]} Config: {setting_label(cfg)}. Mean ± std over {seeds} seed{'s' * (seeds != 1)}; "
            f"(n=k) marks a cell with fewer runs.")


def to_markdown(table: Table) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = ["---" if i < table.labels else "---:" for i in range(len(table.columns))]
    lines = [f"**Table {table.id}.** {table.caption}", "", line(table.columns), line(align)]
    return "\n".join(lines + [line(r) for r in table.rows]) + "\n"


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
                      r"\end{tabular}", r"\end{table}"]) + "\n"


def to_csv(table: Table) -> str:
    """The cells as CSV after a `# caption` line (read back with `pandas.read_csv(path, comment="#")`)."""
    cells = pd.DataFrame(table.rows, columns=table.columns)
    return f"# Table {table.id}. {table.caption}\n" + cells.to_csv(index=False)


def make_tables(df: pd.DataFrame, cfg: dict, selected: dict, published: list[dict]) -> list[Table]:
    """Tables I-V in order."""
    return [table_search(df, cfg, selected, _caption(cfg, "I")),
            table_methods(df, cfg, published, "II", _caption(cfg, "II")),
            table_shots(df, cfg, published, _caption(cfg, "III")),
            table_methods(df, cfg, published, "IV", _caption(cfg, "IV")),
            table_layouts(df, cfg, published, _caption(cfg, "V"))]


def build_tables(df: pd.DataFrame, cfg: dict, selected: dict, published: list[dict],
                 out_dir: str | Path) -> list[Path]:
    """Write `table_<id>.csv`, `.md` and `.tex` for each of Tables I-V; return the paths."""
    out_dir = Path(out_dir)
    paths = []
    for table in make_tables(df, cfg, selected, published):
        for suffix, render in ((".csv", to_csv), (".md", to_markdown), (".tex", to_latex)):
            path = out_dir / f"table_{table.id}{suffix}"
            atomic_write_text(path, render(table))
            paths.append(path)
    return paths
