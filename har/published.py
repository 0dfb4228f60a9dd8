"""The paper's published numbers (Tables I-V, `published.csv` beside this module) in the pipeline's terms, below
the pipeline grid (which tables exist, the savings its runs are evaluated at) and the reports that compare with them.

The CSV keeps the paper's own labels (`table,dataset,ratio,method,setting,metric,value`, percentages) so it can be
checked line by line against the paper; `PAPER_METHODS` and `PAPER_METRICS` are the one place that maps them to the
pipeline's method keys (config.yaml `methods:`) and result columns.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from har.errors import ResultError

# The paper's tables, in order: I t line search, II CIFAR-LT, III ImageNet-LT / iNaturalist, IV no
# re-weighting, V exit layouts.
TABLES = ("I", "II", "III", "IV", "V")

COLUMNS = ("table", "dataset", "ratio", "method", "setting", "metric", "value")

# The paper's method labels -> the pipeline's method keys. Table IV's Focal(g=0.5) is the package's focal
# (loss.focal_gamma defaults to 0.5, as in the paper); Table II's Focal is the same method.
PAPER_METHODS = {
    "CE": "ce", "Focal": "focal", "Mixup": "mixup", "Manifold Mixup": "manifold_mixup", "CE+DRW": "ce_drw",
    "Focal+DRW": "focal_drw", "HAR(CE)+DRW": "har_ce_drw", "LDAM+DRW": "ldam_drw", "HAR(LDAM)+DRW": "har_ldam_drw",
    "CRT": "crt", "LWS": "lws", "tau-norm": "tau_norm", "LDAM": "ldam", "HAR(CE)": "har_ce", "HAR(LDAM)": "har_ldam",
    "Focal(g=0.5)": "focal", "Focal(g=1.0)": "focal_g1", "Focal(g=2.0)": "focal_g2",
}

# The paper's metric names -> result columns (fractions in the results frame): its "all" is overall top-1.
PAPER_METRICS = {"top1": "top1", "all": "top1", "many": "many", "medium": "medium", "few": "few",
                 "flops_saving": "saving"}

BBN = "BBN (Zhou et al., CVPR 2020)"

# Rows the paper copied from other papers (double dagger) instead of training them: (table, label) -> source.
COPIED_FROM = {("II", "Focal"): BBN, ("II", "Mixup"): BBN, ("II", "Manifold Mixup"): BBN,
               ("III", "CRT"): "Kang et al. (ICLR 2020)", ("III", "LWS"): "Kang et al. (ICLR 2020)",
               ("III", "tau-norm"): "Kang et al. (ICLR 2020)"}

# Rows the paper marks with a single dagger: its own re-implementations, following LDAM-DRW's code, whose CIFAR
# script reports the best test epoch; the fidelity report judges them on that column too.
REIMPLEMENTED = frozenset({("II", "CE"), ("II", "CE+DRW"), ("II", "LDAM+DRW"), ("III", "CE"), ("III", "Focal+DRW"),
                           ("III", "CE+DRW"), ("III", "LDAM+DRW")})

# BBN's Table 1: top-1 error (%) of ResNet-32 on CIFAR-LT, a year before the paper, per row and split
# (dataset, ratio). Rows CE, CE-DRW and LDAM-DRW (BBN cites LDAM-DRW for the last two).
BBN_TABLE_1 = {
    "CE": {("cifar10", 100): 29.64, ("cifar10", 50): 25.19, ("cifar10", 10): 13.61,
           ("cifar100", 100): 61.68, ("cifar100", 50): 56.15, ("cifar100", 10): 44.29},
    "CE+DRW": {("cifar10", 100): 23.66, ("cifar10", 50): 20.03, ("cifar10", 10): 12.44,
               ("cifar100", 100): 58.49, ("cifar100", 50): 54.71, ("cifar100", 10): 41.88},
    "LDAM+DRW": {("cifar10", 100): 22.97, ("cifar10", 50): 18.97, ("cifar10", 10): 11.84,
                 ("cifar100", 100): 57.96, ("cifar100", 50): 53.38, ("cifar100", 10): 41.29},
}

# Tables whose HAR rows are dynamic-mode accuracies at the FLOPs saving printed under them (Sec. IV-D).
DYNAMIC_TABLES = ("II", "III")

_T_SETTING = re.compile(r"t=(?P<t>[0-9.]+)(?P<per_class>/C)?")
_LAYOUT_SETTING = re.compile(r"layout=(?P<layout>[CBE]+)")


@dataclass(frozen=True)
class PaperValue:
    """One published number, keyed as the pipeline keys its runs."""

    table: str
    dataset: str
    ratio: float | None  # CIFAR imbalance ratio; None for ImageNet-LT / iNaturalist (one split each)
    label: str  # the paper's method label
    method: str  # pipeline method key; Table V: "<method>@<layout>", as grid.layout_variants names it
    t_point: float | None  # Table I: the t grid value (in units of 1/C for HAR(LDAM)); else None
    metric: str  # a key of PAPER_METRICS' values: top1, many, medium, few, saving
    value: float  # percent, as printed

    @property
    def copied_from(self) -> str | None:
        return COPIED_FROM.get((self.table, self.label))

    @property
    def same_as_bbn(self) -> float | None:
        """BBN's Table 1 top-1 (100 - its error) where this single-dagger value equals it to the paper's rounding:
        the paper marks the row as its own run, but prints the number BBN published (docs/method.md, "Where the
        paper's CIFAR baseline values come from"); None elsewhere."""
        error = BBN_TABLE_1.get(self.label, {}).get((self.dataset, self.ratio)) if self.table == "II" else None
        if error is None or self.metric != "top1" or not self.reimplemented:
            return None
        return 100 - error if abs(100 - error - self.value) <= 0.05 + 1e-9 else None

    @property
    def origin(self) -> str | None:
        """Where the paper's number came from, when not from its own run: the fidelity report's note."""
        if self.copied_from:
            return f"the paper copied this value from {self.copied_from}"
        if (bbn := self.same_as_bbn) is not None:
            return f"the same value, to its rounding, as {BBN} Table 1 ({bbn:.2f}), though the paper marks the row " \
                   f"as its own run"
        return None

    @property
    def reimplemented(self) -> bool:
        """A single-dagger row: the authors' run after LDAM-DRW's protocol (best test epoch on CIFAR)."""
        return (self.table, self.label) in REIMPLEMENTED

    def matches(self, table: str, dataset: str, ratio: float | None, method: str) -> bool:
        """Same table, dataset, split and method (list datasets have one split, whatever ratio a record carries)."""
        same_split = self.ratio is None or (ratio is not None and math.isclose(self.ratio, float(ratio)))
        return (self.table, self.dataset, self.method) == (table, dataset, method) and same_split


def _parse(row: dict, where: str) -> PaperValue:
    table, label, setting = row["table"], row["method"], row["setting"]
    if table not in TABLES:
        raise ResultError(f"{where}: table {table!r} is not one of {list(TABLES)}; fix the line")
    if label not in PAPER_METHODS:
        raise ResultError(f"{where}: method {label!r} has no pipeline key; add it to PAPER_METHODS in "
                          f"har/published.py")
    if row["metric"] not in PAPER_METRICS:
        raise ResultError(f"{where}: metric {row['metric']!r} is not one of {list(PAPER_METRICS)}; fix the line")
    try:
        value = float(row["value"])
        ratio = float(row["ratio"]) if row["ratio"] else None
    except ValueError as exc:
        raise ResultError(f"{where}: value and ratio must be numbers ({exc}); fix the line") from exc
    method, t_point = PAPER_METHODS[label], None
    if (match := _T_SETTING.fullmatch(setting)) is not None:
        t_point = float(match["t"])
    elif (match := _LAYOUT_SETTING.fullmatch(setting)) is not None:
        method = f"{method}@{match['layout']}"
    elif setting:
        raise ResultError(f"{where}: setting {setting!r} is neither t=<value>[/C] nor layout=<CBE...>; fix the line")
    return PaperValue(table, row["dataset"], ratio, label, method, t_point, PAPER_METRICS[row["metric"]], value)


def load_published(path: str | Path | None = None) -> list[PaperValue]:
    """The paper's numbers (`published.csv` beside this module unless `path` is given), checked line by line."""
    source = Path(path) if path else resources.files("har") / "published.csv"
    try:
        lines = source.read_text().splitlines()
    except OSError as exc:
        raise ResultError(f"{source} is unreadable ({exc}); reinstall har or pass the path of a published.csv") \
            from exc
    reader = csv.DictReader(lines)
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise ResultError(f"{source}: the header must be {','.join(COLUMNS)} (got {reader.fieldnames})")
    return [_parse(row, f"{source} line {i}") for i, row in enumerate(reader, start=2)]


@lru_cache(maxsize=1)
def _package_values() -> tuple[PaperValue, ...]:
    return tuple(load_published())


def paper_savings(table: str, dataset: str, ratio: float | None, method: str) -> list[float]:
    """The FLOPs savings the paper prints under a Table II / III cell, as fractions (empty: none printed)."""
    return [v.value / 100 for v in _package_values()
            if v.metric == "saving" and v.matches(table, dataset, ratio, method)]


def target_savings_for(dataset: str, ratio: float | None, method: str) -> list[float]:
    """Every saving the paper prints for a split and method across Tables II and III: the savings at which its
    runs must be evaluated (`eval.target_savings`) for the tables to compare like with like."""
    found = {s for table in DYNAMIC_TABLES for s in paper_savings(table, dataset, ratio, method)}
    return sorted(found)
