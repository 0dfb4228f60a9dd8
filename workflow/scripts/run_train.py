# ruff: noqa: F821 - `snakemake` is the object Snakemake's script directive injects
from har.pipeline.jobs import setup_job, train_run

setup_job(snakemake.log[0], snakemake.threads)
train_run(snakemake.config, snakemake.params.spec, snakemake.input.get("bundle"), snakemake.input.get("selection"),
          snakemake.output[0], processes=max(1, int(snakemake.resources.get("gpu", 0))))
