rule split_build:
    output:
        bundle="results/splits/{split}/data.npz",
        summary="results/splits/{split}/split.json",
    params:
        dataset=lambda wildcards: SPLITS[wildcards.split][0],
        ratio=lambda wildcards: SPLITS[wildcards.split][1],
    log:
        "logs/splits/{split}.log",
    resources:
        **resources_for("split"),
    script:
        "../scripts/split_build.py"
