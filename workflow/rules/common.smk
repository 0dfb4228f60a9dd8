# Config validation and every input function; the grid logic itself lives in har.pipeline.grid.
import sys

from snakemake.utils import validate

from har.config import ConfigError
from har.pipeline import grid
from har.reporting.figures import figure_names

validate(config, schema="../schemas/config.schema.yaml")

FINAL_RUNS = grid.final_runs(config)
TSEARCH_RUNS = grid.tsearch_runs(config)
RUNS = {spec.run_dir: spec for spec in FINAL_RUNS + TSEARCH_RUNS}
for _spec in RUNS.values():  # every run's own fields, checked before any job starts
    try:
        grid.run_config(config, _spec)
    except ConfigError as exc:
        raise ValueError(f"config: method {_spec.base_method!r}: {exc}") from None
if grid.untrainable_methods(config):
    print(f"har: not trained, the package cannot train them yet (left out of every table): "
          f"{', '.join(grid.untrainable_methods(config))}", file=sys.stderr)

SPLITS = {grid.split_name(d, r): (d, r) for d, r in grid.splits(config)}


wildcard_constraints:
    split="|".join(SPLITS) or "none",
    run_dir=r"results/(runs|tsearch)/[^/]+/[^/]+(/t[^/]+)?/seed[0-9]+",


def resources_for(kind):
    """SLURM / local resources of a job kind from the config (gpu only when asked for)."""
    r = config["resources"][kind]
    out = {"runtime": r["runtime"], "mem_mb": r["mem_mb"], "cpus_per_task": r["cpus"]}
    if r["gpu"]:
        out["gpu"] = r["gpu"]
    return out


def bundle_of(split):
    return f"results/splits/{split}/data.npz"


def selection_file(spec):
    return f"results/selection/{spec.split}/{spec.base_method}.json"


def get_run_inputs(wildcards):
    spec = RUNS[wildcards.run_dir]
    inputs = {"bundle": bundle_of(spec.split)}
    if grid.needs_selected_t(config, spec):
        inputs["selection"] = selection_file(spec)
    return inputs


def get_search_reports(wildcards):
    return [f"{s.run_dir}/eval/val.json" for s in TSEARCH_RUNS
            if s.split == wildcards.split and s.base_method == wildcards.method]


def get_selection_files():
    return sorted({f"results/selection/{s.split}/{s.base_method}.json" for s in TSEARCH_RUNS})


def get_eval_reports():
    return [f"{s.run_dir}/eval/{part}.json" for s in RUNS.values() for part in ("val", "test")]


def get_records():
    return [grid.describe(config, spec) for spec in RUNS.values()]


def get_table_files():
    return expand("results/tables/table_{table}.{ext}", table=grid.TABLES, ext=["csv", "md", "tex"])


def get_figure_files():
    return expand("figures/{figure}.{ext}", figure=figure_names(config), ext=["png", "pdf"])
