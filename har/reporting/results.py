"""Every run's evaluation as one row of a table, checked before it can reach a paper table or figure.

A stale, half-written or foreign eval file would otherwise slip silently into the results, so each run's
`eval/<split>.json` must be complete and computed for the config hash in its own folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from har.config import stored_config_hash
from har.errors import ResultError
from har.evaluation.dynamic import READINGS
from har.evaluation.selection import parse_selection_key, selection_key
from har.run.folder import CONFIG, EVAL_DIR, METRICS
from har.run.machine import read_machines
from har.run.machine import summary as machine_summary

# The numeric columns `load_results` adds to each record (fractions in [0, 1], MACs and s as they are).
# dyn_*: at the most accurate s; best_epoch_top1: the maximum of
# metrics.jsonl's `test_top1` (LDAM-DRW's best-epoch protocol; NaN when no epoch recorded it).
RESULT_COLUMNS = ("top1", "many", "medium", "few", "macs", "dyn_s", "dyn_top1", "dyn_saving", "dyn_many",
                  "dyn_medium", "dyn_few", "val_top1", "val_many", "val_medium", "val_few", "best_epoch_top1")
# Per choice of s for a target saving X under a reading R (`saving>=X`, `saving_trunk>=X`) of the test report,
# `load_results` adds the columns `target_column(metric, X, R)`; `reached`: 1 when every choosing half reached X.
TARGET_METRICS = ("top1", "saving", "saving_trunk", "s", "reached", "many", "medium", "few")

# The fields of `grid.describe` records and what `load_results` adds besides the metrics.
RECORD_FIELDS = ("dataset", "ratio", "split", "method", "base_method", "display", "tables", "seed", "t_point", "role",
                 "run_dir")
RUN_FIELDS = ("har", "train_threshold", "layout", "num_exits", "data_label", "data_official")

# What a report needs from each split's JSON, as key paths.
_REQUIRED = {
    "test": ("config_sha256", "static.top1", "static.shot.many", "static.shot.medium", "static.shot.few",
             "static.macs", "dynamic_sweep", "dynamic_selected.best.exit_threshold", "dynamic_selected.best.top1",
             "dynamic_selected.best.saving", "dynamic_selected.best.per_exit", "flops.backbone_macs",
             "flops.exits", "groups", "class_counts"),
    "val": ("config_sha256", "static.top1"),
}


# Config labels of the paper's own setting (config.yaml says "paper setting"); any other label is flagged.
PAPER_LABELS = ("paper", "paper setting")



def setting_label(cfg: dict) -> str:
    """The config's label for captions and titles, flagged unless it is the paper's setting."""
    label = str(cfg.get("label") or "unlabelled config")
    plain = label.strip().lower()
    if plain in PAPER_LABELS or plain.startswith("paper setting") or "not the paper" in label:
        return label
    return f"{label} (not the paper's setting)"


def target_column(metric: str, saving: float, reading: str = "saving") -> str:
    """The results column of one metric at the s chosen for a target saving under a reading (heads counted:
    `saving`; not counted: `saving_trunk`), from `dynamic_selected[selection_key(reading, saving)]` of
    eval/test.json."""
    return f"{metric}[{selection_key(reading, saving)}]"


def target_label(saving: float, reading: str) -> str:
    """How tables and the fidelity report name a dynamic line at the s chosen for a target saving and reading."""
    return f"dynamic, s for the paper's {100 * saving:g}% saving, {READINGS[reading]}"


def provenance_text(df: pd.DataFrame) -> str:
    """Which data the runs saw, for captions: each distinct `data_provenance` label, flagged unless official."""
    if df.empty or "data_label" not in df.columns:
        return "data provenance not recorded"
    parts = []
    for label, official in dict.fromkeys(zip(df["data_label"], df["data_official"])):
        if label is None or (isinstance(label, float) and math.isnan(label)):
            parts.append("data provenance not recorded")
        else:
            official = official is not None and not (isinstance(official, float) and math.isnan(official)) \
                and bool(official)
            named = str(label) if "official" in str(label).lower() else f"official {label}"
            parts.append(named if official else f"{label} (not the official files)")
    return "; ".join(dict.fromkeys(parts))


def machine_text(df: pd.DataFrame) -> str:
    """Where and in which precision the runs trained, for captions: each distinct machine of their machine.jsonl."""
    if df.empty or "machine" not in df.columns:
        return "not recorded"
    parts = list(dict.fromkeys(part for text in df["machine"] for part in str(text).split("; ")))
    if len(parts) > 1 and "not recorded" in parts:  # tau-norm trains nothing; runs older than machine.jsonl
        parts = [p for p in parts if p != "not recorded"] + ["not recorded for some runs"]
    return "; ".join(parts)


def _lookup(report: dict, dotted: str) -> Any:
    node: Any = report
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(dotted)
        node = node[key]
    return node


def _has(report: dict, dotted: str) -> bool:
    try:
        _lookup(report, dotted)
    except KeyError:
        return False
    return True


def read_eval(run_dir: Path, split: str) -> dict:
    """`eval/<split>.json` of a run, refused unless complete and computed for the run folder's config."""
    path = run_dir / EVAL_DIR / f"{split}.json"
    if not (run_dir / CONFIG).is_file():
        raise ResultError(f"{run_dir} has no config.yaml: not a trained run folder; train it with har train")
    if not path.is_file():
        raise ResultError(f"{run_dir} has no eval/{split}.json; evaluate it with har evaluate")
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultError(f"{path} is unreadable ({exc}); delete it and evaluate {run_dir} again") from exc
    if not isinstance(report, dict):
        raise ResultError(f"{path} is not an evaluation report; delete it and evaluate {run_dir} again")
    missing = [key for key in _REQUIRED[split] if not _has(report, key)]
    if missing:
        raise ResultError(f"{path} is incomplete (missing {', '.join(missing)}); evaluate {run_dir} again")
    expected = stored_config_hash(read_run_config(run_dir)) or "(invalid)"
    if report["config_sha256"] != expected:
        raise ResultError(f"{path} was computed for another config (config_sha256 {report['config_sha256'][:12]}, "
                          f"the folder's config.yaml {expected[:12]}); evaluate {run_dir} again")
    return report


def read_run_config(run_dir: Path) -> dict:
    """The resolved run config (`config.yaml`) as plain values."""
    path = run_dir / CONFIG
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ResultError(f"{path} is missing or unreadable ({exc}); train {run_dir} again") from exc
    if not isinstance(values, dict) or not isinstance(values.get("loss"), dict):
        raise ResultError(f"{path} is not a run config; train {run_dir} again")
    return values


def _metrics_rows(run_dir: Path) -> list[dict]:
    """Every row of a run's `metrics.jsonl`, refused with the fix when it is missing or unreadable."""
    path = run_dir / METRICS
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultError(f"{path} is missing or unreadable ({exc}); train {run_dir} again") from exc


def read_metrics(run_dir: Path) -> list[dict]:
    """The per-epoch training rows of `metrics.jsonl`."""
    rows = _metrics_rows(run_dir)
    if not rows or "exit_loss" not in rows[-1] or "exit_fraction" not in rows[-1]:
        raise ResultError(f"{run_dir / METRICS} has no epoch with exit_loss and exit_fraction; train {run_dir} again")
    return rows


def read_outputs(run_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Cached logits [exits, N, C] and labels [N] of `eval/<split>.npz`."""
    path = run_dir / EVAL_DIR / f"{split}.npz"
    try:
        with np.load(path) as archive:
            return archive["logits"], archive["labels"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ResultError(f"{path} is missing, truncated or corrupt ({type(exc).__name__}: {exc}); delete it and "
                          f"evaluate {run_dir} again") from exc


def _targets(selected: dict) -> dict[str, Any]:
    """Every choice of s for a target saving as `target_column` entries (the s, top-1, both savings and shot
    accuracies reached, and whether the target was reached; older reports lack the last two)."""
    out: dict[str, Any] = {}
    for name, entry in selected.items():
        if (key := parse_selection_key(name)) is None:
            continue
        shot, reached = entry.get("shot") or {}, (entry.get("target") or {}).get("reached")
        values = {"top1": entry.get("top1"), "saving": entry.get("saving"), "saving_trunk": entry.get("saving_trunk"),
                  "s": entry.get("exit_threshold"), "reached": None if reached is None else float(all(reached)),
                  **{g: shot.get(g) for g in ("many", "medium", "few")}}
        out.update({target_column(metric, key[1], key[0]): values[metric] for metric in TARGET_METRICS})
    return out


def best_epoch_top1(run_dir: Path) -> float | None:
    """The best `test_top1` of metrics.jsonl (epochs from the first lr decay on), or None when none recorded it."""
    values = [row["test_top1"] for row in _metrics_rows(run_dir)
              if isinstance(row, dict) and row.get("test_top1") is not None]
    return max(values) if values else None


def _provenance(test: dict) -> tuple[str | None, bool | None]:
    """`data_provenance` of the test report (optional: older evaluations lack it), as a caption names it.

    The caption leaves out the folder the files were read from: the same files under two paths (two machines, a
    fresh clone) are one source, and a reader elsewhere needs to know which files, not where they lay. Files
    that are not the official release carry a digest of their recorded hashes instead, so that two different
    copies never read as one.
    """
    info = test.get("data_provenance")
    if not isinstance(info, dict):
        return None, None
    label, official, files = info.get("label"), info.get("official"), info.get("files")
    if isinstance(label, str) and info.get("source"):
        label = label.replace(f" at {info['source']}", "", 1)
    if isinstance(label, str) and not official and files:
        label = f"{label}, files digest {files_digest(files)}"
    return label, official


def files_digest(files: dict[str, str]) -> str:
    """A short name for a set of files: the first 12 hex digits of a sha256 over their names and hashes."""
    text = json.dumps(files, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _row(record: dict, root: Path) -> dict:
    run_dir = root / record["run_dir"]
    test, val = read_eval(run_dir, "test"), read_eval(run_dir, "val")
    config = read_run_config(run_dir)
    best = test["dynamic_selected"]["best"]
    shot, best_shot, val_shot = test["static"]["shot"], best.get("shot") or {}, val["static"].get("shot") or {}
    data_label, data_official = _provenance(test)
    return dict(record, top1=test["static"]["top1"], many=shot["many"], medium=shot["medium"], few=shot["few"],
                macs=test["static"]["macs"], dyn_s=best["exit_threshold"], dyn_top1=best["top1"],
                dyn_saving=best["saving"], dyn_many=best_shot.get("many"), dyn_medium=best_shot.get("medium"),
                dyn_few=best_shot.get("few"), val_top1=val["static"]["top1"],
                val_many=val_shot.get("many"), val_medium=val_shot.get("medium"), val_few=val_shot.get("few"),
                best_epoch_top1=best_epoch_top1(run_dir), har=bool(config["loss"].get("har")),
                train_threshold=config["loss"].get("train_threshold"),
                layout=(config.get("model") or {}).get("layout"), num_exits=len(test["flops"]["exits"]),
                data_label=data_label, data_official=data_official, machine=machine_summary(read_machines(run_dir)),
                **_targets(test["dynamic_selected"]))


def load_results(records: Sequence[dict], root: str | Path) -> pd.DataFrame:
    """One row per run: the record's fields, static and dynamic test metrics, static validation metrics, the
    best-epoch top-1, the data provenance and, per choice of s for a target saving, the `target_column`s.

    Accuracies and savings stay fractions; `har` and `train_threshold` come from the run's own config.yaml.
    """
    rows = [_row(record, Path(root)) for record in records]
    df = pd.DataFrame(rows) if rows else pd.DataFrame(columns=[*RECORD_FIELDS, *RESULT_COLUMNS, *RUN_FIELDS])
    targets = [c for c in df.columns if c.endswith("]") and ">=" in c]
    for column in (*RESULT_COLUMNS, *targets):
        df[column] = pd.to_numeric(df[column], errors="coerce").astype(float)
    return df


def summarise(df: pd.DataFrame, by: str | Iterable[str], metrics: Iterable[str] = RESULT_COLUMNS,
              each: str | None = None) -> pd.DataFrame:
    """Mean, sample std (ddof=1: NaN for one seed) and count of non-missing values of each metric per group; with
    `each` (a column such as "seed"), also every value behind them, so that a report can show each seed's.

    Columns: the `by` keys, then `<metric>_mean`, `<metric>_std`, `<metric>_n` (and `<metric>_each`: the group's
    (each, value) pairs with a value, in `each` order); groups keep their first order.
    """
    by = [by] if isinstance(by, str) else list(by)
    metrics = [m for m in metrics if m in df.columns]
    stat_names = ("mean", "std", "n") + (("each",) if each is not None else ())
    columns = by + [f"{m}_{stat}" for m in metrics for stat in stat_names]
    if df.empty:
        return pd.DataFrame(columns=columns)
    grouped = df[by + metrics].groupby(by, dropna=False, sort=False)[metrics]
    stats = {"mean": grouped.mean(), "std": grouped.std(ddof=1), "n": grouped.count()}
    if each is not None:
        stats["each"] = df[by + metrics + [each]].groupby(by, dropna=False, sort=False)[[each, *metrics]].apply(
            lambda group: pd.Series({m: value_pairs(group[each], group[m]) for m in metrics}, dtype=object))
    out = pd.concat([stats[stat][m].rename(f"{m}_{stat}") for m in metrics for stat in stats], axis=1)
    return pd.concat([out.index.to_frame(index=False), out.reset_index(drop=True)], axis=1)[columns]


def value_pairs(keys: pd.Series, values: pd.Series) -> tuple[tuple[int, float], ...]:
    """(key, value) for each non-missing value, in key order (keys: seeds)."""
    return tuple(sorted((int(k), float(v)) for k, v in zip(keys, values) if not pd.isna(v)))
