rule run_train:
    input:
        unpack(get_run_inputs),
    output:
        "{run_dir}/train.json",
    params:
        spec=lambda wildcards: RUNS[wildcards.run_dir],
        # the run's own config: editing a method's fields reruns exactly its runs (--rerun-triggers params)
        run_config=lambda wildcards: grid.run_config(config, RUNS[wildcards.run_dir]),
    log:
        "logs/{run_dir}/train.log",
    benchmark:
        "logs/{run_dir}/train.benchmark.tsv"
    threads: lambda wildcards: grid.run_resources(config, RUNS[wildcards.run_dir], "train")["cpus"]
    resources:
        **run_resources("train"),
    script:
        "../scripts/run_train.py"


rule run_evaluate:
    input:
        trained="{run_dir}/train.json",
    output:
        val="{run_dir}/eval/val.json",
        test="{run_dir}/eval/test.json",
    params:
        spec=lambda wildcards: RUNS[wildcards.run_dir],
        # the config's savings and the paper's for the run's cell: changing them re-evaluates the run
        target_savings=lambda wildcards: grid.target_savings(config, RUNS[wildcards.run_dir]),
    log:
        "logs/{run_dir}/evaluate.log",
    benchmark:
        "logs/{run_dir}/evaluate.benchmark.tsv"
    threads: lambda wildcards: grid.run_resources(config, RUNS[wildcards.run_dir], "evaluate")["cpus"]
    resources:
        **run_resources("evaluate"),
    script:
        "../scripts/run_evaluate.py"
