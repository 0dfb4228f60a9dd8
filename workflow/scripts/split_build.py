# ruff: noqa: F821 - `snakemake` is the object Snakemake's script directive injects
from har.pipeline.jobs import build_split, setup_job

setup_job(snakemake.log[0])
build_split(snakemake.config, snakemake.params.dataset, snakemake.params.ratio, snakemake.output.get("bundle"),
            snakemake.output.summary)
