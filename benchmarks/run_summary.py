"""The numbers of a few finished run folders side by side, whatever config they came from: for comparing runs that
the tables do not aggregate together (the reference set's fp32 control beside its bf16 run, a probe on another
data copy beside the run on the shared one).

Per folder: the precision it trained in, static test top-1 of the last epoch, the best test epoch (LDAM-DRW's
optimistic protocol, where recorded), dynamic top-1 at every s chosen for a target saving with the saving reached,
and, over each epoch window given, the mean share of training examples leaving at each exit (HAR runs) and each
class's mean training top-1 (where `metrics.jsonl` records it, `train.record_per_class_up_to`). Reads
`eval/test.json` through the reports' own reader (refusing a stale or incomplete one), `metrics.jsonl` and
`machine.jsonl`; no data, no weights.

    python benchmarks/run_summary.py results/reference/runs/cifar10-r100/har_ldam_drw*/seed0 --windows 121-160 161-200
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from har.evaluation.dynamic import READINGS
from har.evaluation.selection import parse_selection_key
from har.reporting.results import best_epoch_top1, read_eval, read_metrics
from har.run.machine import read_machines, summary


def window(text: str) -> tuple[int, int]:
    """'121-160' -> (121, 160): epochs counted from 1, as the docs and figures count them (metrics.jsonl's `epoch`
    counts from 0), both ends included."""
    try:
        first, last = (int(x) for x in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an epoch window FIRST-LAST, e.g. 121-160") from None
    if first < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: epochs count from 1 (the first epoch is 1)")
    if first > last:
        raise argparse.ArgumentTypeError(f"{text!r}: the first epoch comes after the last")
    return first, last


def summarise(run: Path, windows: list[tuple[int, int]]) -> list[str]:
    """Markdown lines describing one finished run folder."""
    report = read_eval(run, "test")
    best = best_epoch_top1(run)
    lines = [f"**{run}** ({summary(read_machines(run))})", "",
             f"- static top-1, last epoch: {100 * report['static']['top1']:.2f}"
             + ("" if best is None else f"; best test epoch (optimistic): {100 * best:.2f}")]
    selected = report["dynamic_selected"] if len(report["exits"]) > 1 else {}  # a bare backbone has no dynamic mode
    for name, entry in selected.items():
        if (key := parse_selection_key(name)) is None:
            continue
        reading, target = key
        lines.append(f"- dynamic top-1 at s for a {100 * target:g}% saving, {READINGS[reading]}: "
                     f"{100 * entry['top1']:.2f} (reached {100 * entry[reading]:.1f}%)")
    rows = read_metrics(run)
    for first, last in windows:
        inside = [row for row in rows if first <= row["epoch"] + 1 <= last]
        if not inside:
            raise SystemExit(f"{run} has no epoch in {first}-{last} (it trained {len(rows)})")
        if len(rows[-1]["exit_fraction"]) > 1:
            mean = 100 * np.mean([row["exit_fraction"] for row in inside], axis=0)
            lines.append(f"- training examples leaving at each exit, epochs {first}-{last} (mean): "
                         + " / ".join(f"{x:.1f}%" for x in mean))
        per_class = [row["train_top1_per_class"] for row in inside if "train_top1_per_class" in row]
        if per_class:  # None (a class an epoch did not see) left out of its class's mean
            mean = [100 * np.mean(seen) if (seen := [x for x in col if x is not None]) else None
                    for col in zip(*per_class)]
            lines.append(f"- training top-1 per class (last exit, augmented, training mode), epochs {first}-{last} "
                         f"(mean of {len(per_class)}): "
                         + " / ".join("-" if x is None else f"{x:.1f}" for x in mean))
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished, evaluated run folders")
    parser.add_argument("--windows", type=window, nargs="*", default=[],
                        help="epoch windows FIRST-LAST (from 1) over which to average the exit shares and "
                             "per-class training top-1")
    args = parser.parse_args()
    for run in args.runs:
        print("\n".join(summarise(run, args.windows)))


if __name__ == "__main__":
    main()
