# ruff: noqa: F821 - `snakemake` is the object Snakemake's script directive injects
from har.pipeline.jobs import evaluate_run, setup_job

setup_job(snakemake.log[0], snakemake.threads)
evaluate_run(snakemake.params.spec, snakemake.params.target_savings)
