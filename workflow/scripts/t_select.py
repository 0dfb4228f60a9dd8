# ruff: noqa: F821 - `snakemake` is the object Snakemake's script directive injects
from har.pipeline.jobs import select_t, setup_job

setup_job(snakemake.log[0])
select_t(snakemake.config, snakemake.wildcards.split, snakemake.wildcards.method, snakemake.params.runs,
         snakemake.output[0])
