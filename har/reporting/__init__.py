"""Reporting: the paper's Tables I-V (`tables`: data; `render`: Markdown, LaTeX, CSV; `report`: the files), the
fidelity report and Figures 2-7 from the run folders of the pipeline grid.

This package's own namespace holds only what the pipeline may read without building a report (the published values
and the results of run folders): the pipeline grid stands on `published`, and the writers of tables and figures
stand on the grid, so they are imported from their modules (`har.reporting.report.build_tables`,
`har.reporting.figures.plot_figures`).
"""

from har.reporting.published import load_published, paper_savings, target_savings_for
from har.reporting.results import load_results, setting_label, summarise

__all__ = ["load_published", "load_results", "paper_savings", "setting_label", "summarise", "target_savings_for"]
