"""The fidelity report: each published value we trained beside ours, judged by a rule whose false-alarm rate under
a faithful reproduction is stated (`har.reporting.agreement`), and the paper's central claims (HAR minus its
baseline, per split) as paired differences over seeds.

A single cell can miss the paper by more than the seed noise for reasons shared by every row (data copy, last
epoch against best epoch); the claims compare what the paper argues, the gain of HAR over its own baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from har.atomic import atomic_write_text
from har.evaluation.dynamic import READINGS
from har.pipeline import grid
from har.published import PaperValue
from har.reporting.agreement import Rule
from har.reporting.render import sections_to_markdown
from har.reporting.results import (
    machine_text,
    provenance_text,
    setting_label,
    target_column,
    target_label,
    value_pairs,
)
from har.reporting.tables import Section, Table, seed_stats

# The paper's central claims: (HAR method, its baseline), compared per split on Tables II and III.
CLAIMS = (("har_ce_drw", "ce_drw"), ("har_ldam_drw", "ldam_drw"))
COLUMNS = ("kind", "table", "split", "method", "mode", "metric", "ours_mean", "ours_std", "n", "per_seed", "paper",
           "diff", "tolerance", "ci_low", "ci_high", "verdict", "seeds_to_resolve", "note")


def is_quick(cfg: dict) -> bool:
    """A config that says it is not the paper's setting: its numbers cannot judge the reproduction."""
    return "not the paper" in setting_label(cfg)


def _unjudged(cfg: dict, paper: float | None, diff: float | None, std: float | None, n: int) -> str | None:
    """Why a line cannot be judged, or None when it can."""
    if is_quick(cfg):
        return "cannot be judged (quick config, not the paper's setting)"
    if paper is None:
        return "no paper value"
    if diff is None:
        return "not measured"
    if n < 2 or std is None:
        return "cannot be judged (n < 2)"
    return None


def judge_cell(cfg: dict, paper: float | None, diff: float | None, std: float | None, n: int) -> dict:
    """A published cell against our n seeds: `verdict`, `tolerance` (the largest |diff| that agrees) and
    `seeds_to_resolve` (seeds whose t-interval of our mean is within the rule's resolution)."""
    rule = Rule.from_config(cfg)
    if (reason := _unjudged(cfg, paper, diff, std, n)) is not None:
        return {"verdict": reason}
    tolerance = float(rule.cell_tolerance(std, n))
    verdict = f"agrees (|diff| <= {tolerance:.2f})" if abs(diff) <= tolerance else \
        f"differs (|diff| > {tolerance:.2f})"
    return {"verdict": verdict, "tolerance": tolerance, "seeds_to_resolve": rule.seeds_to_resolve(std)}


def judge_claim(cfg: dict, paper: float | None, mean: float | None, std: float | None, n: int) -> dict:
    """Our paired HAR-minus-baseline differences against the paper's: whether the paper's difference agrees
    (`tolerance`) and whether our t-interval (`ci_low`, `ci_high`) excludes 0."""
    rule = Rule.from_config(cfg)
    diff = None if mean is None or paper is None else mean - paper
    if (reason := _unjudged(cfg, paper, diff, std, n)) is not None:
        return {"verdict": reason}
    tolerance = float(rule.claim_tolerance(std, n))
    low, high = rule.interval(mean, std, n)
    agreement = f"agrees (|diff| <= {tolerance:.2f})" if abs(diff) <= tolerance else \
        f"differs (|diff| > {tolerance:.2f})"
    sign = "our gain > 0" if low > 0 else "our gain < 0" if high < 0 else "our gain not resolved from 0"
    return {"verdict": f"{agreement}; {sign}", "tolerance": tolerance, "ci_low": low, "ci_high": high,
            "seeds_to_resolve": rule.seeds_to_resolve(std)}


def fidelity_lines(tables: Sequence[Table], cfg: dict) -> list[dict]:
    """One line per published cell whose split and method have runs."""
    lines = []
    for table in tables:
        for c in table.comparisons:
            if not c.trained:
                continue
            diff = None if c.mean is None else c.mean - c.paper
            note = c.origin or ""
            lines.append(dict(kind="cell", table=c.table, split=c.split, method=c.method, mode=c.mode,
                              metric=c.metric, ours_mean=c.mean, ours_std=c.std, n=c.n,
                              per_seed=per_seed_text(c.each), paper=c.paper, diff=diff, note=note,
                              **judge_cell(cfg, c.paper, diff, c.std, c.n)))
    return lines


def _paper(published: list[PaperValue], table: str, dataset: str, ratio: float, method: str,
           metric: str) -> float | None:
    found = [v.value for v in published if v.metric == metric and v.matches(table, dataset, ratio, method)]
    return found[0] if found else None


def _paired(har: pd.DataFrame, base: pd.DataFrame, column: str) -> tuple[tuple[int, float], ...]:
    """(seed, HAR's `column` minus the baseline's static top-1 in percent) for each seed both have, in seed order."""
    both = har[["seed", column]].merge(base[["seed", "top1"]], on="seed", suffixes=("", "_base"))
    return value_pairs(both["seed"], 100 * (both[column] - both["top1_base" if column == "top1" else "top1"]))


def per_seed_text(each: Sequence[tuple[int, float]], signed: bool = False) -> str:
    """'0: 72.31, 1: 72.64': every seed's value, as the report prints it."""
    return ", ".join(f"{seed}: {_num(value, signed)}" for seed, value in each) or "-"


def claim_deltas(df: pd.DataFrame, cfg: dict, published: list[PaperValue]) -> list[dict]:
    """Per split of Table II (CIFAR) or III (list datasets) with runs of both methods of a claim: ours (HAR as the
    paper measures it, dynamic at its saving when evaluated there, minus the baseline's static top-1) against the
    paper's delta."""
    finals = df[df["role"] == "final"]
    lines = []
    for table in ("II", "III"):
        for dataset, ratio in grid.splits(cfg, table):
            if table != ("III" if grid.is_list_dataset(dataset) else "II"):  # the paper's table of the split
                continue
            split = grid.split_name(dataset, ratio)
            for har, base in CLAIMS:
                runs = {m: finals[(finals["split"] == split) & (finals["method"] == m)] for m in (har, base)}
                if any(frame.empty for frame in runs.values()):
                    continue
                savings = [v.value / 100 for v in published if v.metric == "saving" and
                           v.matches(table, dataset, ratio, har)]
                static, static_std, _ = seed_stats(_paired(runs[har], runs[base], "top1"))
                his, theirs = (_paper(published, table, dataset, ratio, m, "top1") for m in (har, base))
                paper = None if his is None or theirs is None else his - theirs
                spread = "" if static_std is None else f" ± {static_std:.2f}"
                note = "" if static is None else f"static HAR minus baseline: {static:+.2f}{spread}"
                names = [cfg["methods"][m].get("display", m) for m in (har, base)]
                for column, mode in _claim_modes(runs[har], savings):
                    each = _paired(runs[har], runs[base], column)
                    mean, std, n = seed_stats(each)
                    diff = None if mean is None or paper is None else mean - paper
                    lines.append(dict(kind="claim", table=table, split=split, method=" - ".join(names), mode=mode,
                                      metric="top-1", ours_mean=mean, ours_std=std, n=n,
                                      per_seed=per_seed_text(each, signed=True), paper=paper, diff=diff, note=note,
                                      **judge_claim(cfg, paper, mean, std, n)))
    return lines


def _claim_modes(har: pd.DataFrame, savings: list[float]) -> list[tuple[str, str]]:
    """(column, mode) of HAR's side of a claim as the paper measures it: dynamic at its saving under each reading
    evaluated, else static (saying why)."""
    if not savings:
        return [("top1", "static (the paper prints no saving here)")]
    modes = [(target_column("top1", savings[0], reading), target_label(savings[0], reading)) for reading in READINGS]
    evaluated = [(c, m) for c, m in modes if c in har and har[c].notna().any()]
    return evaluated or [("top1", f"static (not evaluated at the paper's {100 * savings[0]:g}% saving)")]


def _num(value: float | None, signed: bool = False) -> str:
    if _missing(value):
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def fidelity_sections(frame: pd.DataFrame, rule: Rule) -> list[Section]:
    """The report's two tables as text cells: the published cells we trained, and the central claims."""
    columns = ["Table", "Split", "Method", "Mode", "Metric", "ours", "n", "per seed (seed: ours)", "paper", "diff",
               "verdict", f"{100 * (1 - rule.level):g}% CI of ours", f"seeds for ±{rule.resolution:g}", "note"]
    numeric = [False] * 5 + [True] * 2 + [False] + [True] * 2 + [False, True, True, False]
    sections = []
    for kind, title in (("cell", "Published cells we trained"), ("claim", "Central claims: HAR minus its baseline")):
        rows = []
        for r in frame[frame["kind"] == kind].to_dict("records"):
            ours = _num(r["ours_mean"]) + ("" if _missing(r["ours_std"]) else f" ± {r['ours_std']:.2f}")
            ci = "-" if _missing(r["ci_low"]) else f"{r['ci_low']:+.2f} to {r['ci_high']:+.2f}"
            seeds = "-" if _missing(r["seeds_to_resolve"]) else str(int(r["seeds_to_resolve"]))
            rows.append([r["table"], r["split"], r["method"], r["mode"], r["metric"], ours, str(r["n"]),
                         r["per_seed"], _num(r["paper"]), _num(r["diff"], signed=True), r["verdict"], ci, seeds,
                         r["note"]])
        sections.append(Section(title, columns, numeric, rows))
    return sections


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def write_fidelity(tables: Sequence[Table], df: pd.DataFrame, cfg: dict, published: list[PaperValue],
                   out_dir: str | Path) -> list[Path]:
    """Write `fidelity.md` and `fidelity.csv` (a `# caption` line, then one row per cell or claim); return them."""
    rule = Rule.from_config(cfg)
    frame = pd.DataFrame(fidelity_lines(tables, cfg) + claim_deltas(df, cfg, published), columns=list(COLUMNS))
    quick = " A quick config: no line can judge the reproduction." if is_quick(cfg) else ""
    caption = (f"Each published value of Tables I-V whose split and method we trained, ours (mean ± sample std over "
               f"n seeds, percent; per seed: each seed's value) against the paper's; diff: ours - paper. Verdict: "
               f"{rule.describe()}; tolerance: that bound (n < 2: cannot be judged). Claims: HAR minus its baseline "
               f"per split, paired seed by seed; the paper's difference agrees when within t(1 - {rule.level:g}/2, "
               f"n - 1) * sqrt(s^2/n + 2 * {rule.sigma_paper:g}^2) of ours (two single runs), and our gain is "
               f"resolved from 0 when our {100 * (1 - rule.level):g}% t-interval excludes it. Seeds for "
               f"±{rule.resolution:g}: the seeds whose t-interval of our mean (cells) or mean difference (claims) "
               f"would be {rule.resolution:g} point wide on each side at the observed std. Dynamic lines at the "
               f"paper's saving under both readings: exit heads' cost counted and not counted (the paper does not "
               f"say). Config: {setting_label(cfg)}. Data: {provenance_text(df[df['role'] == 'final'])}. Trained on: "
               f"{machine_text(df[df['role'] == 'final'])}.{quick}")
    out_dir = Path(out_dir)
    paths = [out_dir / "fidelity.md", out_dir / "fidelity.csv"]
    atomic_write_text(paths[0], sections_to_markdown("Fidelity report", caption, fidelity_sections(frame, rule)))
    atomic_write_text(paths[1], f"# Fidelity report. {caption}\n" + frame.to_csv(index=False, float_format="%.4f"))
    return paths
