# ruff: noqa: F821 - `snakemake` is the object Snakemake's script directive injects
from har.pipeline.jobs import setup_job, train_pack_job

setup_job(snakemake.log[0], snakemake.threads)
train_pack_job(snakemake.config, snakemake.params.members, snakemake.input.get("bundle"),
               list(snakemake.input.get("selections", [])), snakemake.output[0])
