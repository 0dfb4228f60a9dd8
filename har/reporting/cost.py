"""What each table cost to compute: device-hours summed from the benchmark files Snakemake writes per job.

Every train, pack and evaluate job of the grid (`grid_jobs`) has a benchmark file (`grid.benchmark_file`) whose `s`
column is the job's wall time. A job's GPU-hours are its wall hours times the GPUs its kind asks for in the config
(`grid.run_resources`, `grid.pack_resources`), its CPU core-hours the same with the CPUs; the devices are those its
runs trained on (`machine.jsonl`, `har.run.machine.read_machines`). A job counts in every table with a line of
one of its runs (`grid.run_tables`; a stage-one run also in the tables of the stage two that start from it; a search
run in Table I only, even where its choice of t feeds the final runs) and once in the whole grid, so shared jobs
make the tables' sums exceed the total. Split jobs (no benchmark) and the local jobs (selection, pack markers, tables,
figures) are not counted.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from har.atomic import atomic_write_text
from har.errors import ResultError
from har.pipeline import grid
from har.reporting.render import markdown_row
from har.reporting.results import setting_label
from har.run.machine import read_machines

COLUMNS = ("Table", "Jobs measured", "Wall hours", "GPU-hours", "CPU core-hours", "Trained on")
WHOLE_GRID = "whole grid"


@dataclass(frozen=True)
class Job:
    """One benchmarked job of the grid: its file, the runs it trains or evaluates, what it asks for."""

    benchmark: str
    kind: str  # train | evaluate
    runs: tuple[grid.RunSpec, ...]
    gpus: int
    cpus: int


def grid_jobs(cfg: dict) -> list[Job]:
    """Every pack job, every train job of a run that trains alone, and every run's evaluate job."""
    packs = grid.packs(cfg)
    packed = {spec.run_dir for members in packs.values() for spec in members}
    runs = grid.final_runs(cfg) + grid.tsearch_runs(cfg)

    def job(name: str, kind: str, members: list[grid.RunSpec], resources: dict[str, int]) -> Job:
        return Job(grid.benchmark_file(name, kind), kind, tuple(members), resources["gpu"], resources["cpus"])

    return ([job(f"packs/{name}", "train", members, grid.pack_resources(cfg, members))
             for name, members in packs.items()]
            + [job(s.run_dir, "train", [s], grid.run_resources(cfg, s, "train")) for s in runs
               if s.run_dir not in packed]
            + [job(s.run_dir, "evaluate", [s], grid.run_resources(cfg, s, "evaluate")) for s in runs])


def run_cost_tables(cfg: dict) -> dict[str, set[str]]:
    """Run folder -> the tables its jobs count in: those with a line of the run or of a stage two starting from it."""
    out = {spec.run_dir: set(grid.run_tables(cfg, spec)) for spec in grid.final_runs(cfg) + grid.tsearch_runs(cfg)}
    for spec in grid.final_runs(cfg):
        first = grid.stage_one_run(cfg, spec)
        if first is not None:
            out[first.run_dir] |= out[spec.run_dir]
    return out


def wall_seconds(path: Path) -> float | None:
    """A benchmark file's wall time (its `s` column, summed over repeats); None when the job has not written it."""
    if not path.exists():
        return None
    rows = list(csv.DictReader(io.StringIO(path.read_text()), delimiter="\t"))
    try:
        return sum(float(row["s"]) for row in rows) if rows else None
    except (KeyError, TypeError, ValueError) as exc:
        raise ResultError(f"{path} is not a Snakemake benchmark file (no number in its 's' column: {exc}); delete "
                          f"it, or run the job again") from exc


def devices(root: Path, job: Job) -> set[str]:
    """The devices a job's runs trained on, from their machine records ('NVIDIA H100 80GB HBM3', 'AMD EPYC (CPU)')."""
    return {r["device_name"] if r["device"] != "cpu" else f"{r['device_name']} (CPU)"
            for spec in job.runs for r in read_machines(root / spec.run_dir)}


def cost_rows(cfg: dict, root: str | Path = ".") -> list[list[str]]:
    """One row per table and one for the whole grid: jobs measured of those planned, wall hours, GPU-hours, CPU
    core-hours of the measured jobs, and the devices their runs trained on."""
    root, tables_of = Path(root), run_cost_tables(cfg)
    totals = {key: {"planned": 0, "measured": 0, "wall": 0.0, "gpu": 0.0, "cpu": 0.0, "devices": set()}
              for key in (*grid.TABLES, WHOLE_GRID)}
    for job in grid_jobs(cfg):
        seconds = wall_seconds(root / job.benchmark)
        found = devices(root, job) if seconds is not None else set()
        for key in (*{table for spec in job.runs for table in tables_of[spec.run_dir]}, WHOLE_GRID):
            row = totals[key]
            row["planned"] += 1
            if seconds is None:
                continue
            hours = seconds / 3600
            row["measured"] += 1
            row["wall"] += hours
            row["gpu"] += hours * job.gpus
            row["cpu"] += hours * job.cpus
            row["devices"] |= found
    rows = []
    for key, row in totals.items():
        if not row["planned"]:
            continue
        hours = [f"{row[k]:.2f}" if row["measured"] else "-" for k in ("wall", "gpu", "cpu")]
        rows.append([key if key == WHOLE_GRID else f"Table {key}", f"{row['measured']} of {row['planned']}", *hours,
                     "; ".join(sorted(row["devices"])) or "not recorded"])
    return rows


def caption(cfg: dict) -> str:
    return (f"What the grid cost: per table and for the whole grid, the jobs whose Snakemake benchmark file exists "
            f"(of those planned), their wall hours, GPU-hours (wall time x the GPUs the job's kind asks for) and CPU "
            f"core-hours (x its CPUs), and the devices their runs trained on (machine.jsonl). A job counts in every "
            f"table with a line of its runs (a pack job in those of all its members; a stage-one run also in its "
            f"stage two's table; a t-search run in Table I only) and once in the whole grid, so the tables' sums "
            f"exceed the total. Train, pack and evaluate jobs; split jobs and the local jobs (selection, pack markers, "
            f"tables, figures) are not counted, and a retried job counts the attempt whose file is there. Config: "
            f"{setting_label(cfg)}.")


def write_cost(cfg: dict, root: str | Path, out_dir: str | Path) -> list[Path]:
    """Write `cost.md` and `cost.csv` (a `# caption` line, then the rows) into `out_dir`; return their paths."""
    rows, text = cost_rows(cfg, root), caption(cfg)
    out_dir = Path(out_dir)
    paths = [out_dir / "cost.md", out_dir / "cost.csv"]
    lines = [f"**Cost.** {text}", "", markdown_row(list(COLUMNS)), markdown_row(["---", *["---:"] * 4, "---"])]
    atomic_write_text(paths[0], "\n".join(lines + [markdown_row(row) for row in rows]) + "\n")
    table = io.StringIO()
    csv.writer(table, lineterminator="\n").writerows([COLUMNS, *rows])
    atomic_write_text(paths[1], f"# Cost. {text}\n" + table.getvalue())
    return paths
