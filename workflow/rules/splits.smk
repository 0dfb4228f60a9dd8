rule split_build:
    output:
        bundle=bundle_of("{split}"),
        summary=summary_of("{split}"),
    wildcard_constraints:
        split=one_of(BUNDLED_SPLITS),
    params:
        dataset=lambda wildcards: SPLITS[wildcards.split][0],
        ratio=lambda wildcards: SPLITS[wildcards.split][1],
    log:
        "logs/splits/{split}.log",
    resources:
        **resources_for("split"),
    script:
        "../scripts/split_build.py"


# ImageNet-LT and iNaturalist 2018: no bundle; the job checks the published lists and every listed image.
rule split_verify:
    output:
        summary=summary_of("{split}"),
    wildcard_constraints:
        split=one_of(LIST_SPLITS),
    params:
        dataset=lambda wildcards: SPLITS[wildcards.split][0],
        ratio=lambda wildcards: SPLITS[wildcards.split][1],
    log:
        "logs/splits/{split}.log",
    resources:
        **resources_for("split"),
    script:
        "../scripts/split_build.py"
