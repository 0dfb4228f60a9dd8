# ruff: noqa: F821 - `snakemake` is the object Snakemake's script directive injects
from har.pipeline.jobs import setup_job, write_member_marker

setup_job(snakemake.log[0])
write_member_marker(snakemake.input.pack, snakemake.wildcards.run_dir, snakemake.output[0])
