from har.pipeline.jobs import build_split, setup_job

setup_job(snakemake.log[0])
build_split(snakemake.config, snakemake.params.dataset, snakemake.params.ratio, snakemake.output.bundle,
            snakemake.output.summary)
