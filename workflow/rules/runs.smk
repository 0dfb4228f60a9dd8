# A run that trains alone (every run when pack.size is 1).
rule run_train:
    input:
        unpack(get_run_inputs),
    output:
        "{run_dir}/train.json",
    wildcard_constraints:
        run_dir=one_of(SINGLE_RUNS),
    params:
        spec=lambda wildcards: RUNS[wildcards.run_dir],
        # the run's own config: editing a method's fields reruns exactly its runs (--rerun-triggers params)
        run_config=lambda wildcards: grid.run_config(config, RUNS[wildcards.run_dir]),
    log:
        "logs/{run_dir}/train.log",
    benchmark:
        grid.benchmark_file("{run_dir}", "train")
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
        grid.benchmark_file("{run_dir}", "evaluate")
    threads: lambda wildcards: grid.run_resources(config, RUNS[wildcards.run_dir], "evaluate")["cpus"]
    resources:
        **run_resources("evaluate"),
    script:
        "../scripts/run_evaluate.py"


# A pack of runs (grid.packs): one job trains them all, each into its own folder, and writes the pack's marker
# with each member's train.json content, or the error a member stopped with (the others' evaluations go on).
rule pack_train:
    input:
        unpack(get_pack_inputs),
    output:
        "results/packs/{pack}/pack.json",
    wildcard_constraints:
        pack=one_of(PACKS),
    params:
        members=lambda wildcards: PACKS[wildcards.pack],
        # the members' own configs: editing a method's fields reruns exactly the packs holding its runs (their
        # other members resume finished)
        run_configs=lambda wildcards: [grid.run_config(config, spec) for spec in PACKS[wildcards.pack]],
    log:
        "logs/packs/{pack}/train.log",
    benchmark:
        grid.benchmark_file("packs/{pack}", "train")
    threads: lambda wildcards: grid.pack_resources(config, PACKS[wildcards.pack])["cpus"]
    resources:
        **pack_resources(),
    script:
        "../scripts/pack_train.py"


# A pack member's train.json, which its evaluation (and a stage two on it) waits for, from its pack's marker.
rule pack_member:
    input:
        pack=lambda wildcards: f"results/packs/{PACK_OF[wildcards.run_dir]}/pack.json",
    output:
        "{run_dir}/train.json",
    wildcard_constraints:
        run_dir=one_of(PACK_OF),
    log:
        "logs/{run_dir}/pack_member.log",
    localrule: True
    script:
        "../scripts/pack_member.py"
