# Config validation and every input function; the grid logic itself lives in har.pipeline.grid.
import re
import sys

from snakemake.utils import validate

from har.errors import ConfigError
from har.pipeline import grid
from har.reporting.figures import figure_names

validate(config, schema="../schemas/config.schema.yaml")
try:  # what the schema cannot say (stage-one methods, list datasets, layouts), before any job starts
    grid.check_config(config)
except ConfigError as exc:
    raise ValueError(f"config: {exc}") from None

FINAL_RUNS = grid.final_runs(config)
TSEARCH_RUNS = grid.tsearch_runs(config)
RUNS = {spec.run_dir: spec for spec in FINAL_RUNS + TSEARCH_RUNS}
for _spec in RUNS.values():  # every run's own fields, checked before any job starts
    try:
        grid.run_config(config, _spec)
    except ConfigError as exc:
        raise ValueError(f"config: method {_spec.base_method!r}: {exc}") from None
if grid.untrainable_methods(config):
    print(f"har: not trained (trainable: false; empty rows in the tables): "
          f"{', '.join(grid.untrainable_methods(config))}", file=sys.stderr)
if grid.idle_methods(config):
    print(f"har: not run, their tables meet no dataset's tables: {', '.join(grid.idle_methods(config))}",
          file=sys.stderr)

# Packs (pack.size > 1): runs of one shape trained together by one job (train.pack_executor); every other run alone.
PACKS = grid.packs(config)
PACK_OF = {spec.run_dir: name for name, members in PACKS.items() for spec in members}
SINGLE_RUNS = [run_dir for run_dir in RUNS if run_dir not in PACK_OF]

SPLITS = {grid.split_name(d, r): (d, r) for d, r in grid.splits(config)}
# CIFAR splits are cut once into a bundle; list datasets (ImageNet-LT, iNaturalist 2018) are only verified.
BUNDLED_SPLITS = [split for split, (dataset, _) in SPLITS.items() if not grid.is_list_dataset(dataset)]
LIST_SPLITS = [split for split, (dataset, _) in SPLITS.items() if grid.is_list_dataset(dataset)]


def one_of(names):
    """A wildcard regex matching exactly these names (and nothing when there are none)."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


wildcard_constraints:
    split=one_of(SPLITS),
    run_dir=r"results/(runs|tsearch)/[^/]+/[^/]+(/t[^/]+)?/seed[0-9]+",


# Snakemake's resource names and the config's.
RESOURCE_NAMES = {"runtime": "runtime", "mem_mb": "mem_mb", "cpus_per_task": "cpus", "gpu": "gpu"}


def resources_for(kind):
    """SLURM / local resources of a job kind from the config (gpu only when asked for)."""
    r = config["resources"][kind]
    return {key: r[name] for key, name in RESOURCE_NAMES.items() if key != "gpu" or r["gpu"]}


def job_resources(of, jobs, wildcard):
    """Resources of a job kind: `of(job)` gives one job's from the config, `jobs` maps the value of the rule's
    `wildcard` to the job; gpu only when some job asks for one."""

    def value(name):
        return lambda wildcards: of(jobs[getattr(wildcards, wildcard)])[name]

    asked = any(of(job)["gpu"] for job in jobs.values())
    return {key: value(name) for key, name in RESOURCE_NAMES.items() if key != "gpu" or asked}


def run_resources(kind):
    """Resources of a run job kind (train, evaluate): the top-level ones, with its dataset's own on top."""
    return job_resources(lambda spec: grid.run_resources(config, spec, kind), RUNS, "run_dir")


def pack_resources():
    """Resources of a pack job: its dataset's train ones with pack.resources on top (grid.pack_resources)."""
    return job_resources(lambda members: grid.pack_resources(config, members), PACKS, "pack")


def bundle_of(split):
    return f"results/splits/{split}/data.npz"


def summary_of(split):
    return f"results/splits/{split}/split.json"


def selection_file(spec):
    """The t selection a final run's t comes from (grid.fed_from: ImageNet-LT's for every dataset, the paper's
    protocol, when the grid searches there; else the run's own split's)."""
    return f"results/selection/{grid.fed_from(config, spec)}/{spec.base_method}.json"


def get_run_inputs(wildcards):
    spec = RUNS[wildcards.run_dir]
    # CIFAR runs read the split's bundle; list-dataset runs start once the split job has verified the lists
    if grid.is_list_dataset(spec.dataset):
        inputs = {"split": summary_of(spec.split)}
    else:
        inputs = {"bundle": bundle_of(spec.split)}
    if grid.needs_selected_t(config, spec):
        inputs["selection"] = selection_file(spec)
    first = grid.stage_one_run(config, spec)
    if first is not None:  # a decoupled run's stage two starts from its stage-one run, trained once and shared
        inputs["stage_one"] = f"{first.run_dir}/train.json"
    return inputs


def get_pack_inputs(wildcards):
    """A pack's members' inputs: their split's bundle and the t selections any of them waits on."""
    members = PACKS[wildcards.pack]
    return {"bundle": bundle_of(members[0].split),
            "selections": sorted({selection_file(s) for s in members if grid.needs_selected_t(config, s)})}


def get_search_reports(wildcards):
    """The search runs' reports t is chosen on (grid.t_chosen_on: ImageNet-LT's val, else the test halves) and
    their test reports."""
    runs = [s for s in TSEARCH_RUNS if s.split == wildcards.split and s.base_method == wildcards.method]
    parts = sorted({grid.t_chosen_on(s.dataset) for s in runs} | {"test"})
    return [f"{s.run_dir}/eval/{part}.json" for s in runs for part in parts]


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
