"""Per-class test top-1 of finished run folders, mean over the seeds of each method: where a gap between two
methods (or between a method and the paper) sits along the long tail.

Reads only `eval/test.json` (static mode: the bare backbone, or a HAR model's final exit) and the class counts
its evaluation recorded, through the reports' own reader, which refuses a report that is incomplete or was computed
for another config than the folder's; no data, no weights.

    python benchmarks/per_class.py results/reference/runs/cifar10-r100/*/seed*
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from har.reporting.results import read_eval


def per_class(folders: list[Path]) -> tuple[pd.DataFrame, list[int]]:
    """One row per method (the folder two levels up: `<method>/seed<k>`), columns `seeds`, `top1` and one per class,
    in %, averaged over that method's seeds; and the training images per class. Folders of different splits are
    refused, since their classes are not the same."""
    rows, counts = [], None
    for folder in folders:
        report = read_eval(folder, "test")
        if counts is not None and report["class_counts"] != counts:
            raise SystemExit(f"{folder} was evaluated on another split than the folders before it; give the run "
                             f"folders of one split")
        counts = report["class_counts"]
        static = report["static"]
        rows.append({"method": folder.parent.name, "top1": 100 * static["top1"],
                     **{str(c): 100 * acc for c, acc in enumerate(static["per_class"])}})
    if not rows:
        raise SystemExit("no run folder given")
    frame = pd.DataFrame(rows)
    table = frame.groupby("method", sort=False).mean()
    table.insert(0, "seeds", frame.groupby("method", sort=False).size())
    return table, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished run folders (holding eval/test.json)")
    table, counts = per_class(parser.parse_args().runs)
    header = ["method", "seeds", "top-1", *(f"class {c} ({n})" for c, n in enumerate(counts))]
    print("| " + " | ".join(header) + " |\n| --- |" + " ---: |" * (len(header) - 1))
    for method, row in table.iterrows():
        cells = [method, str(int(row["seeds"])), *(f"{row[k]:.1f}" for k in ["top1", *map(str, range(len(counts)))])]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
