rule t_select:
    input:
        get_search_reports,
    output:
        "results/selection/{split}/{method}.json",
    params:
        runs=lambda wildcards: [s for s in TSEARCH_RUNS
                                if s.split == wildcards.split and s.base_method == wildcards.method],
    log:
        "logs/selection/{split}/{method}.log",
    localrule: True
    script:
        "../scripts/t_select.py"
