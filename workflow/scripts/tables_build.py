# ruff: noqa: F821 - `snakemake` is the object Snakemake's script directive injects
from har.pipeline.jobs import load_selections, setup_job
from har.published import load_published
from har.reporting.cost import write_cost
from har.reporting.report import build_tables
from har.reporting.results import load_results

setup_job(snakemake.log[0])
results = load_results(snakemake.params.records, ".")
build_tables(results, snakemake.config, load_selections(snakemake.input.selections), load_published(),
             "results/tables")
write_cost(snakemake.config, ".", "results/tables")
