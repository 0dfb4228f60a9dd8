# Every published value beside ours, judged against our seeds: written with the tables (har.reporting.fidelity).
FIDELITY_FILES = ["results/tables/fidelity.md", "results/tables/fidelity.csv"]
# What each table cost, from the train and evaluate jobs' benchmark files, all written before this job starts
# (har.reporting.cost).
COST_FILES = ["results/tables/cost.md", "results/tables/cost.csv"]


rule tables_build:
    input:
        reports=get_eval_reports(),
        selections=get_selection_files(),
    output:
        report(
            get_table_files() + FIDELITY_FILES + COST_FILES,
            caption="../report/tables.rst",
            category="Tables",
        ),
    params:
        records=get_records(),
    log:
        "logs/reporting/tables.log",
    localrule: True
    script:
        "../scripts/tables_build.py"


rule figures_plot:
    input:
        reports=get_eval_reports(),
        bundles=[bundle_of(split) for split in BUNDLED_SPLITS],  # Fig. 7's test images (CIFAR)
    output:
        report(
            get_figure_files(),
            caption="../report/figures.rst",
            category="Figures",
        ),
    params:
        records=get_records(),
    log:
        "logs/reporting/figures.log",
    localrule: True
    script:
        "../scripts/figures_plot.py"
