# ruff: noqa: F821 - `snakemake` is the object Snakemake's script directive injects
from pathlib import Path

from har.pipeline.jobs import setup_job
from har.reporting.figures import plot_figures

setup_job(snakemake.log[0])
bundles = {Path(b).parent.name: b for b in snakemake.input.bundles}
plot_figures(snakemake.params.records, ".", snakemake.config, "figures", bundles)
