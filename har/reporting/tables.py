"""The paper's Tables I-V from the run results, as CSV, Markdown and LaTeX, every published value beside ours.

Rows are (split, method, mode) lines. A published value sits on the line that measures what the paper measured:
the static line for static methods and for Tables I, IV and V; for Tables II and III's HAR methods the dynamic line
at the s chosen for the FLOPs saving the paper prints under the cell. Each such cell records a `Comparison`, which
the fidelity report lists. Markdown and LaTeX are written here rather than by pandas, which would need tabulate and
jinja2 for them. Every caption carries the config label and the data provenance, so a quick run on a copy of the
data can never pass for the paper's setting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from har.config import LossConfig
from har.evaluation.dynamic import READINGS
from har.pipeline import grid
from har.published import DYNAMIC_TABLES, PaperValue
from har.reporting.coverage import coverage_note
from har.reporting.results import machine_text, provenance_text, setting_label, summarise, target_column, target_label

COPIED = "‡"  # the paper copied the row from another paper
NOT_EVALUATED = "§"  # the runs were not evaluated at the paper's saving
UNREACHED = "¶"  # no s reached the paper's saving on a half it was chosen on
BEST_EPOCH = "optimistic (best test epoch, LDAM-DRW's protocol)"


@dataclass(frozen=True)
class Comparison:
    """One published value beside ours (percent): a line of the fidelity report."""

    table: str
    split: str
    method: str
    mode: str
    metric: str
    each: tuple[tuple[int, float], ...]  # (seed, ours) of every run with a value, in seed order
    paper: float
    trained: bool  # the split and method have runs
    origin: str | None  # where the paper's number came from, when not from its own run (PaperValue.origin)

    @property
    def mean(self) -> float | None:
        return seed_stats(self.each)[0]

    @property
    def std(self) -> float | None:
        return seed_stats(self.each)[1]

    @property
    def n(self) -> int:
        return len(self.each)


def seed_stats(each: Sequence[tuple[int, float]]) -> tuple[float | None, float | None, int]:
    """Mean, sample std (None below two seeds) and count of per-seed values."""
    values = [value for _, value in each]
    if not values:
        return None, None, 0
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None, len(values)


@dataclass(frozen=True)
class Table:
    """One table's cells as text; the first `labels` columns name the row, the others hold numbers."""

    id: str
    caption: str
    columns: list[str]
    rows: list[list[str]]
    labels: int
    notes: tuple[str, ...] = ()
    comparisons: tuple[Comparison, ...] = ()


@dataclass(frozen=True)
class Section:
    """A titled table of a report made of several (the fidelity report's cells and claims): its cells as text, and
    which columns hold numbers (right-aligned); `empty` stands in for the table when it has no rows."""

    title: str
    columns: list[str]
    numeric: list[bool]
    rows: list[list[str]]
    empty: str = "(none in this config)"


@dataclass(frozen=True)
class Mode:
    """How a line's numbers were measured: static (final exit), validation (Table I), dynamic at the s chosen for
    a target saving, or dynamic at the most accurate s."""

    kind: str  # static | validation | target | best
    saving: float | None = None  # target: the paper's saving (fraction)
    reading: str = "saving"  # target: the saving's reading, a key of READINGS (heads counted or not)

    @property
    def label(self) -> str:
        if self.kind == "target":
            return target_label(self.saving, self.reading)
        return {"static": "static", "validation": "static (validation)", "best": "dynamic, most accurate s"}[self.kind]

    def column(self, metric: str) -> str:
        """The results column holding `metric` (top1, many, medium, few, saving, reached) in this mode; a target
        line's saving is the one of its reading."""
        if self.kind == "target":
            return target_column(self.reading if metric == "saving" else metric, self.saving, self.reading)
        return {"static": metric, "validation": f"val_{metric}", "best": f"dyn_{metric}"}[self.kind]

    def measures(self, paper: Mode) -> bool:
        """Whether this line measures what the paper's mode measured (a target line: under either reading)."""
        return (self.kind, self.saving) == (paper.kind, paper.saving)


@dataclass
class Line:
    """One row: its label cells, the stats key of its runs, and what the paper calls it."""

    labels: list[str]
    name: str  # the method as the fidelity report names it
    key: tuple
    dataset: str
    ratio: float
    method: str
    mode: Mode
    t_point: float | None = None
    paper: dict[str, PaperValue] = field(default_factory=dict)  # metric -> the published value on this line


def _cell(stats: pd.Series | None, column: str, seeds: int) -> str:
    """`mean ± std` in percent; `(n=k)` flags a cell with fewer runs than seeds (std needs two)."""
    if stats is None or f"{column}_n" not in stats or not stats[f"{column}_n"] or \
            math.isnan(stats[f"{column}_mean"]):
        return "-"
    n = int(stats[f"{column}_n"])
    text = f"{100 * stats[f'{column}_mean']:.1f}"
    if n > 1:
        text += f" ± {100 * stats[f'{column}_std']:.1f}"
    return text if n == seeds else f"{text} (n={n})"


def _ours(stats: pd.Series | None, column: str) -> tuple[float | None, float | None, int]:
    """Mean, std (percent) and count of a column; (None, None, 0) without values."""
    if stats is None or f"{column}_n" not in stats or not stats[f"{column}_n"]:
        return None, None, 0
    std = stats[f"{column}_std"]
    return 100 * stats[f"{column}_mean"], None if math.isnan(std) else 100 * std, int(stats[f"{column}_n"])


def _each(stats: pd.Series | None, column: str) -> tuple[tuple[int, float], ...]:
    """(seed, value in percent) of every run with a value in a column."""
    if stats is None or f"{column}_each" not in stats:
        return ()
    return tuple((int(seed), 100 * value) for seed, value in stats[f"{column}_each"])


def _index(summary: pd.DataFrame, keys: list[str]) -> dict[tuple, pd.Series]:
    return {tuple(row[k] for k in keys): row for _, row in summary.iterrows()}


def _is_har(df: pd.DataFrame, cfg: dict, method: str) -> bool:
    """From the runs' own configs; for a method without runs, from its config fields (package default: HAR)."""
    runs = df[df["method"] == method]
    if len(runs):
        return bool(runs["har"].all())
    spec = cfg["methods"][method.split("@")[0]]
    if not spec.get("trainable", True):
        return False
    loss = {**spec.get("run", {}).get("loss", {}), **(cfg.get("run_overrides") or {}).get("loss", {})}
    return bool(loss.get("har", LossConfig.har))


def _note(table_id: str, caption: str, text: str) -> Table:
    return Table(table_id, caption, ["Note"], [[text]], 1)


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


def _values(published: list[PaperValue], table_id: str, dataset: str, ratio: float, method: str,
            t_point: float | None = None) -> list[PaperValue]:
    return [v for v in published if v.matches(table_id, dataset, ratio, method)
            and (v.t_point is None) == (t_point is None)
            and (t_point is None or math.isclose(v.t_point, t_point))]


def _paper_mode(table_id: str, har: bool, values: list[PaperValue]) -> Mode:
    """The mode the paper's numbers of a cell were measured in (Sec. IV-D; README of the paper's values)."""
    if table_id == "I":
        return Mode("validation")
    if table_id not in DYNAMIC_TABLES or not har:
        return Mode("static")
    savings = [v.value / 100 for v in values if v.metric == "saving"]
    return Mode("target", savings[0]) if savings else Mode("best")


def _method_lines(df: pd.DataFrame, cfg: dict, published: list[PaperValue], table_id: str, labels: list[str],
                  name: str, dataset: str, ratio: float, split: str, method: str) -> list[Line]:
    """A method's lines on one split: static; for HAR methods also dynamic at the paper's saving and at the most
    accurate s. The published values go to the line of the paper's mode."""
    har = _is_har(df, cfg, method)
    values = _values(published, table_id, dataset, ratio, method)
    paper_mode = _paper_mode(table_id, har, values)
    modes = [Mode("static")]
    if har:
        modes += [Mode("target", v.value / 100, reading) for v in values if v.metric == "saving"
                  for reading in READINGS] + [Mode("best")]
    if any(v.copied_from for v in values):
        labels, name = [labels[0], f"{labels[1]} {COPIED}", *labels[2:]], f"{name} {COPIED}"
    lines = []
    for mode in modes:
        paper = {v.metric: v for v in values
                 if mode.measures(paper_mode) and (v.metric != "saving" or mode.kind == "target")}
        lines.append(Line([*labels, mode.label], name, (split, method), dataset, ratio, method, mode, paper=paper))
    return lines


def _build(table_id: str, caption: str, label_columns: list[str], lines: list[Line],
           metrics: list[tuple[str, str]], stats: dict[tuple, pd.Series], seeds: int,
           extra: tuple[tuple[str, str], ...] = ()) -> Table:
    """Cells of every line: per metric ours (and paper / diff where any line has a published value), the MACs
    saving reached on dynamic lines (beside the paper's saving on the line of its saving), the best-epoch column
    where runs recorded it, `extra` (header, static column) cells."""
    columns, rows, comparisons, notes = [*label_columns], [list(line.labels) for line in lines], [], set()
    dynamic = any(line.mode.kind in ("target", "best") for line in lines)
    measured = [(m, h) for m, h in metrics] + ([("saving", "MACs saving")] if dynamic else [])
    for metric, header in measured:
        with_paper = any(metric in line.paper for line in lines)
        columns += [header] + ([f"{header} paper", f"{header} diff"] if with_paper else [])
        for row, line in zip(rows, lines):
            own = stats.get(line.key)
            column = line.mode.column(metric) if metric != "saving" or line.mode.kind != "static" else None
            row.append(_cell(own, column, seeds) if column else "-")
            if not with_paper:
                continue
            fact = line.paper.get(metric)
            if fact is None:
                row += ["-", "-"]
                continue
            comparison = Comparison(table_id, line.key[0], line.name, line.mode.label, header,
                                    _each(own, column) if column else (), fact.value, own is not None, fact.origin)
            mean = comparison.mean
            row += [f"{fact.value:.1f}", "-" if mean is None else f"{mean - fact.value:+.1f}"]
            comparisons.append(comparison)
    for row, line in zip(rows, lines):
        own = stats.get(line.key)
        if line.mode.kind != "target" or own is None:
            continue
        if _ours(own, line.mode.column("top1"))[2] == 0:
            row[len(label_columns) - 1] += f" {NOT_EVALUATED}"
            notes.add(f"{NOT_EVALUATED} not evaluated at the paper's saving in this reading: add "
                      f"{line.mode.saving:g} to eval.target_savings of these runs "
                      f"(har.published.target_savings_for lists them) and evaluate them again (har "
                      f"evaluate --from-cache needs neither data nor weights).")
        elif (reached := _ours(own, line.mode.column("reached"))[0]) is not None and reached < 100:
            row[len(label_columns) - 1] += f" {UNREACHED}"
            notes.add(f"{UNREACHED} in some run no s reached the paper's saving on a test half it was chosen on: "
                      f"the largest saving (every image out of the first exit) is reported.")
    static = [line for line in lines if line.mode.kind == "static"]
    if any(_ours(stats.get(line.key), "best_epoch_top1")[2] for line in static):
        columns.append(BEST_EPOCH)
        for row, line in zip(rows, lines):
            row.append(_cell(stats.get(line.key), "best_epoch_top1", seeds) if line.mode.kind == "static" else "-")
        comparisons += _best_epoch_comparisons(table_id, static, stats, dict(metrics).get("top1"))
    for header, column in extra:
        columns.append(header)
        for row, line in zip(rows, lines):
            row.append(_cell(stats.get(line.key), column, seeds))
    if any(COPIED in cell for row in rows for cell in row[:len(label_columns)]):
        notes.add(f"{COPIED} the paper copied this row from another paper (BBN on CIFAR, Kang et al. on ImageNet-LT "
                  f"and iNaturalist) instead of training it: our run is not the run behind its number.")
    bbn = {f"{line.name} ({line.key[0]})": None for line in lines
           if (fact := line.paper.get("top1")) is not None and fact.same_as_bbn is not None}
    if bbn:
        notes.add(f"The paper's values of {', '.join(bbn)} equal, to their rounding, BBN's Table 1 (Zhou et al., CVPR "
                  f"2020), though the paper marks these rows as its own runs (docs/method.md).")
    return Table(table_id, caption, columns, rows, len(label_columns), tuple(sorted(notes)), tuple(comparisons))


def _best_epoch_comparisons(table_id: str, lines: list[Line], stats: dict[tuple, pd.Series],
                            header: str | None) -> list[Comparison]:
    """The paper's single-dagger rows (its re-implementations after LDAM-DRW, whose script reports the best test
    epoch) beside our best-epoch top-1, where runs recorded it: judged there too, labelled optimistic."""
    out = []
    for line in lines:
        fact = line.paper.get("top1")
        each = _each(stats.get(line.key), "best_epoch_top1")
        if fact is not None and fact.reimplemented and each:
            out.append(Comparison(table_id, line.key[0], line.name, BEST_EPOCH, header, each, fact.value, True,
                                  fact.origin))
    return out


def _metric_stats(df: pd.DataFrame, keys: list[str]) -> dict[tuple, pd.Series]:
    """Mean, std and count of every result column (the `saving>=X` ones included) per key."""
    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
               and c not in ("ratio", "t_point", "seed")]
    return _index(summarise(df, keys, numeric, each="seed"), keys)


def table_search(df: pd.DataFrame, cfg: dict, published: list[PaperValue], selected: dict, caption: str) -> Table:
    """Table I: validation metrics and test top-1 of every t of the line search; the t `select_t` picked marked;
    the paper's values (ImageNet-LT validation) beside ImageNet-LT rows."""
    search = cfg["t_search"]
    units = search.get("per_class_units") or {}
    runs = df[df["role"] == "tsearch"]
    stats = _metric_stats(runs, ["split", "method", "t_point"])
    lines = []
    for dataset, ratio, split in _splits(cfg, "I"):
        for m in grid.searched_methods(cfg):
            for t in search[cfg["methods"][m]["t_search"]]:
                t = float(t)
                chosen = (selected.get(split) or {}).get(m) or {}
                mark = "yes" if chosen.get("t_point") is not None and math.isclose(chosen["t_point"], t) else ""
                t_text = f"{t:g}"
                if units.get(cfg["methods"][m]["t_search"]):
                    t_text += "/C"
                    if (split, m, t) in stats:
                        t_text += f" ({stats[(split, m, t)]['train_threshold_mean']:.3g})"
                paper = {v.metric: v for v in _values(published, "I", dataset, ratio, m, t)}
                lines.append(Line([split, _display(cfg, m), t_text, mark], f"{_display(cfg, m)} t={t:g}",
                                  (split, m, t), dataset, ratio, m, Mode("validation"), t, paper))
    if not lines:
        return _note("I", caption, "no method of this config has a t line search")
    metrics = [("many", "val many"), ("medium", "val medium"), ("few", "val few"), ("top1", "val top-1")]
    return _build("I", caption, ["Split", "Method", "t", "Selected"], lines, metrics, stats,
                  len(search["seeds"]), extra=(("test top-1", "top1"),))


def table_methods(df: pd.DataFrame, cfg: dict, published: list[PaperValue], table_id: str, caption: str) -> Table:
    """Tables II, III and IV: per split and method a static line, and for HAR methods dynamic lines."""
    methods = [m for m, spec in cfg["methods"].items() if table_id in spec.get("tables", [])]
    if not methods:
        return _note(table_id, caption, f"no method of this config is listed for Table {table_id}")
    finals = df[(df["role"] == "final") & df["method"].isin(methods)]
    lines = [line for dataset, ratio, split in _splits(cfg, table_id) for m in methods
             for line in _method_lines(df, cfg, published, table_id, [split, _display(cfg, m)], _display(cfg, m),
                                       dataset, ratio, split, m)]
    metrics = [("top1", "top-1")] if table_id == "II" else \
        [("many", "many"), ("medium", "medium"), ("few", "few"), ("top1", "all")]
    return _build(table_id, caption, ["Split", "Method", "Mode"], lines, metrics,
                  _metric_stats(finals, ["split", "method"]), len(cfg["seeds"]))


def table_layouts(df: pd.DataFrame, cfg: dict, published: list[PaperValue], caption: str) -> Table:
    """Table V: the layout method with its default layout and each variant, static (the paper's mode) and
    dynamic."""
    method = (cfg.get("layouts") or {}).get("method")
    variants = [method] + grid.layout_variants(cfg) if method in grid.trainable_methods(cfg) else []
    finals = df[(df["role"] == "final") & df["method"].isin(variants)]
    if not variants:
        return _note("V", caption, "no exit layout runs in this config")
    stats = _metric_stats(finals, ["split", "method"])
    layouts = dict(zip(finals["method"], finals["layout"].fillna("default")))
    lines = []
    for dataset, ratio, split in _splits(cfg, "V"):
        for v in variants:
            exits = f"{stats[(split, v)]['num_exits_mean']:.0f}" if (split, v) in stats else "-"
            layout = layouts.get(v, v.partition("@")[2] or "default")
            lines += _method_lines(df, cfg, published, "V", [split, layout, exits],
                                   f"{_display(cfg, method)} [{layout}]", dataset, ratio, split, v)
    metrics = [("many", "many"), ("medium", "medium"), ("few", "few"), ("top1", "all")]
    return _build("V", caption, ["Split", "Layout", "Exits", "Mode"], lines, metrics, stats, len(cfg["seeds"]))


CAPTIONS = {
    "I": "Line search of the HAR training threshold t: validation metrics and test top-1 (%) of each t (t/C: a grid "
         "in units of 1/C, the threshold in brackets). Selected: on ImageNet-LT the t with the best mean validation "
         "top-1 (the paper's protocol), elsewhere the best mean test top-1 (the selection file's crossfit_top1 is "
         "the test top-1 of a t chosen on one test half and scored on the other). A selected t trains the final "
         "runs only with t_search.feed_final (ImageNet-LT's on every dataset unless t_search.feed_from says "
         "otherwise); by default they take the paper's t.",
    "II": "CIFAR-LT, ResNet-32: test top-1 (%). Static: the final exit. The paper's HAR rows are dynamic-mode "
          "accuracies at the FLOPs saving printed under them: they sit beside our dynamic top-1 at the s chosen for "
          "that saving, under both readings of a saving; our dynamic top-1 at the most accurate s follows.",
    "III": "Test top-1 (%) on many- (> 100 training images), medium- (20-100) and few-shot (< 20) classes and "
           "overall. The paper's HAR rows are dynamic-mode at the FLOPs saving printed under them, beside our "
           "dynamic lines at the s chosen for that saving under both readings of a saving.",
    "IV": "No re-weighting: test top-1 (%) in static mode (the paper's mode for this table), per shot group and "
          "overall; HAR methods also dynamic at the most accurate s.",
    "V": "Exit layouts (C stem, B block group, E exit): test top-1 (%) in static mode (the paper's mode for this "
         "table), per shot group and overall, and dynamic at the most accurate s.",
}

SAVINGS = ("MACs saving: 1 - mean MACs per image / the bare backbone's, with the exit heads' cost counted unless the "
           "mode says 'heads not counted' (the backbone up to the exit alone); the paper does not say which its FLOPs "
           "savings are, so its HAR rows sit beside ours at its saving under both readings. Dynamic lines: s chosen "
           "on one class-stratified test half and reported on the other, both ways (ImageNet-LT: chosen on its "
           "validation list); the paper chose s on the test split itself. At the paper's saving, s is the one whose "
           "saving on the choosing half is the smallest at or above the paper's (candidates: the exits' own "
           "confidences); the MACs saving column is what that s reached on the reported images, the paper's beside "
           "it.")
PAPER_COLUMNS = "paper: the published value; diff: ours - paper (percentage points)."


def _stand_in(cfg: dict, table_id: str) -> str:
    """Tables I and IV of the paper are ImageNet-LT ResNet-50: elsewhere ours are stand-ins without its values."""
    others = [split for dataset, _, split in _splits(cfg, table_id) if dataset != "imagenet_lt"]
    if table_id not in ("I", "IV") or not others:
        return ""
    what = "t search" if table_id == "I" else "table"
    return (f" The paper's Table {table_id} is ImageNet-LT with ResNet-50: on {', '.join(others)} this {what} is a "
            f"stand-in, and the paper's values appear only beside ImageNet-LT rows.")


def _caption(cfg: dict, df: pd.DataFrame, table_id: str) -> str:
    seeds = len(cfg["t_search"]["seeds"]) if table_id == "I" else len(cfg["seeds"])
    runs = df[df["role"] == "tsearch"] if table_id == "I" else \
        df[(df["role"] == "final") & df["tables"].map(lambda tables: table_id in tables)]
    savings = f" {SAVINGS}" if table_id != "I" else ""
    return (f"{CAPTIONS[table_id]}{_stand_in(cfg, table_id)}{savings} {PAPER_COLUMNS} Config: {setting_label(cfg)}. "
            f"Data: {provenance_text(runs)}. Trained on: {machine_text(runs)}. "
            f"Mean ± std over {seeds} seed{'s' * (seeds != 1)}; (n=k) marks a cell "
            f"with fewer runs.")


def make_tables(df: pd.DataFrame, cfg: dict, selected: dict, published: list[PaperValue]) -> list[Table]:
    """Tables I-V in order, each noting which of its published cells the grid trains (`coverage_note`)."""
    tables = [table_search(df, cfg, published, selected, _caption(cfg, df, "I")),
              table_methods(df, cfg, published, "II", _caption(cfg, df, "II")),
              table_methods(df, cfg, published, "III", _caption(cfg, df, "III")),
              table_methods(df, cfg, published, "IV", _caption(cfg, df, "IV")),
              table_layouts(df, cfg, published, _caption(cfg, df, "V"))]
    return [replace(t, notes=(*t.notes, coverage_note(cfg, published, t.id))) for t in tables]
