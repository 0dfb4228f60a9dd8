"""LDAM-DRW's own run (`benchmarks/upstream_train.py`) beside our runs of the same method, epoch by epoch: where
the two trainings part, if they do, and where each ends.

Reads the logs LDAM-DRW's `cifar_train.py` writes and our run folders' `metrics.jsonl` (finished or not); no data,
no weights. Upstream, `log_train.csv` prints a running average of training top-1 every ten batches, so an epoch's
value here is its last print (batch 90 of 97 on CIFAR-10-LT-100), and `log_test.csv` holds one block per finished
epoch: test top-1, per-class accuracy and the best top-1 so far; an epoch without its block (training now, or cut
short) is left out. A restarted run leaves one pair of logs per start (`upstream_train.py` renames the earlier pair
to `log_*.<time>.csv`); a later start's epochs replace an earlier one's, since a start repeats the epoch a stop cut
short. Ours: each epoch's `train_top1` over the whole epoch and,
from the first lr decay on, `test_top1`; for the per-class line, a finished run's `eval/test.json` (static mode).
Epochs count from 1, as the docs count them.

    python benchmarks/upstream_compare.py benchmarks/results/upstream-ce_drw \\
        results/reference/runs/cifar10-r100/ce_drw/seed*
"""

from __future__ import annotations

import argparse
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from har.errors import ResultError
from har.reporting.results import read_eval, read_metrics

TRAIN_LINE = re.compile(r"Epoch: \[(\d+)\]\[\d+/\d+\].*?Prec@1 [\d.]+ \(([\d.]+)\)")
TEST_TOP1 = re.compile(r"Results: Prec@1 ([\d.]+)")
TEST_CLASSES = re.compile(r"Class Accuracy: \[([^\]]*)\]")
TEST_BEST = re.compile(r"Best Prec@1: ([\d.]+)")


@dataclass
class Upstream:
    """One upstream run, in %: training top-1 and test top-1 per epoch (counted from 1), the per-class test accuracy
    of its last logged epoch, and the best test top-1 its last log printed."""
    train: dict[int, float] = field(default_factory=dict)
    test: dict[int, float] = field(default_factory=dict)
    classes: list[float] = field(default_factory=list)
    best: float | None = None


def log_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(log_train, log_test) of every start, oldest first: the renamed pairs by their time stamps, then the current
    pair. A training log without its test log is refused, since its epochs could not be placed."""
    trains = sorted(folder.glob("log_train.*.csv")) + sorted(folder.glob("log_train.csv"))
    if not trains:
        raise SystemExit(f"{folder} holds no log_train.csv: give the folder that holds LDAM-DRW's logs (its "
                         f"log/<store_name>/, or a copy such as benchmarks/results/upstream-ce_drw)")
    pairs = []
    for train in trains:
        test = train.with_name(train.name.replace("log_train", "log_test", 1))
        if not test.is_file():
            raise SystemExit(f"{train} has no {test.name} beside it: copy the pair together")
        pairs.append((train, test))
    return pairs


def read_upstream(folder: Path) -> Upstream:
    """The run's finished epochs from all its starts; the first epoch a start trained is its first training line's,
    and its test blocks follow from there (the script tests after every epoch it finishes: an epoch without its test
    block is still training, or was cut short and trained again by the next start)."""
    run = Upstream()
    for train_log, test_log in log_pairs(folder):
        epochs: dict[int, float] = {}
        for line in train_log.read_text().splitlines():
            if match := TRAIN_LINE.match(line):
                epochs[int(match.group(1)) + 1] = float(match.group(2))
        blocks = [b for b in test_log.read_text().split("\n\n") if TEST_TOP1.search(b)]
        if blocks and not epochs:
            raise SystemExit(f"{test_log} has test results but {train_log.name} no training line to place them")
        if len(blocks) > len(epochs):
            raise SystemExit(f"{test_log} has {len(blocks)} test results for {len(epochs)} epochs in "
                             f"{train_log.name}: the two logs are not of one start")
        first = min(epochs, default=0)
        run.train.update({e: v for e, v in epochs.items() if e < first + len(blocks)})  # finished epochs only
        for i, block in enumerate(blocks):
            run.test[first + i] = float(TEST_TOP1.search(block).group(1))
            if classes := TEST_CLASSES.search(block):
                run.classes = [100 * float(x) for x in classes.group(1).split(",")]
            if best := TEST_BEST.search(block):
                run.best = float(best.group(1))
    return run


def read_ours(folder: Path) -> tuple[dict[int, float], dict[int, float]]:
    """Training and test top-1 (%) per epoch counted from 1, from a run folder's metrics.jsonl."""
    try:
        rows = read_metrics(folder)
    except ResultError as exc:
        raise SystemExit(str(exc)) from None
    train = {row["epoch"] + 1: 100 * row["train_top1"] for row in rows}
    test = {row["epoch"] + 1: 100 * row["test_top1"] for row in rows if row.get("test_top1") is not None}
    return train, test


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _seeds(values: list[float | None]) -> str:
    return " / ".join("-" if v is None else f"{v:.2f}" for v in values)


def _mean(values: list[float]) -> str:
    """Mean +/- sample std of our runs' values, and their count."""
    if not values:
        return "-"
    std = f" +/- {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.2f}{std} (n = {len(values)})"


def compare(upstream: Upstream, ours: dict[Path, tuple[dict[int, float], dict[int, float]]], every: int) -> list[str]:
    """The report's lines: an epoch table (every `every`-th epoch, each epoch both sides tested, the last) and the
    ends: last and best test top-1 on each side."""
    if not ours:
        raise SystemExit("no run folder of ours given")
    last = max(upstream.train, default=0)
    tested_by_all = set(upstream.test).intersection(*(test for _, test in ours.values()))
    shown = sorted({e for e in upstream.train if e % every == 0 or e == last} | tested_by_all)
    names = [folder.name for folder in ours]
    lines = [f"| epoch | LDAM-DRW train | ours train ({' / '.join(names)}) | LDAM-DRW test | ours test |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for e in shown:
        lines.append(f"| {e} | {_cell(upstream.train.get(e))} | {_seeds([t.get(e) for t, _ in ours.values()])} | "
                     f"{_cell(upstream.test.get(e))} | {_seeds([s.get(e) for _, s in ours.values()])} |")
    done = max(upstream.test, default=0)
    best = _cell(upstream.best) or "-"
    lines += ["", f"LDAM-DRW: tested to epoch {done}, last {upstream.test[done]:.2f}, best {best}" if done
              else "LDAM-DRW: no epoch tested yet"]
    finals = [test[max(test)] for _, test in ours.values() if test]
    bests = [max(test.values()) for _, test in ours.values() if test]
    lines.append(f"ours: last tested epoch {_mean(finals)}, best epoch {_mean(bests)}")
    return lines


def per_class_lines(upstream: Upstream, ours: dict[Path, tuple[dict[int, float], dict[int, float]]]) -> list[str]:
    """LDAM-DRW's per-class test accuracy at its last tested epoch beside ours at the end (the mean over the folders
    whose evaluation is there); none when either side has none."""
    reports, epochs = [], set()
    for folder, (train, _) in ours.items():
        try:
            reports.append(read_eval(folder, "test"))
        except ResultError:
            continue
        epochs.add(max(train))
    if not upstream.classes or not reports:
        return []
    mean = np.mean([r["static"]["per_class"] for r in reports], axis=0) * 100
    if len(mean) != len(upstream.classes):
        raise SystemExit(f"LDAM-DRW's log has {len(upstream.classes)} classes, our evaluation {len(mean)}: "
                         f"compare runs of one dataset")
    header = " | ".join(f"class {c}" for c in range(len(mean)))
    ours_label = f"ours, epoch {'/'.join(map(str, sorted(epochs)))} (mean of {len(reports)})"
    return ["", f"| per class, last epoch | {header} |", "| --- |" + " ---: |" * len(mean),
            f"| LDAM-DRW, epoch {max(upstream.test)} | " + " | ".join(f"{v:.1f}" for v in upstream.classes) + " |",
            f"| {ours_label} | " + " | ".join(f"{v:.1f}" for v in mean) + " |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("upstream", type=Path, help="the folder holding LDAM-DRW's log_train*.csv and log_test*.csv")
    parser.add_argument("runs", type=Path, nargs="+", help="our run folders of the same method (one per seed)")
    parser.add_argument("--every", type=int, default=10, help="show every N-th epoch (default 10)")
    args = parser.parse_args()
    if args.every < 1:
        parser.error("--every must be at least 1")
    upstream = read_upstream(args.upstream)
    ours = {folder: read_ours(folder) for folder in args.runs}
    print("\n".join(compare(upstream, ours, args.every) + per_class_lines(upstream, ours)))


if __name__ == "__main__":
    main()
