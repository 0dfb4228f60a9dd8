"""Reporting: the paper's Tables I-V, the fidelity report and Figures 2-7 from the run folders of the pipeline grid."""

from har.reporting.figures import plot_figures
from har.reporting.published import load_published, paper_savings, target_savings_for
from har.reporting.results import ResultError, load_results, setting_label, summarise
from har.reporting.tables import build_tables

__all__ = ["ResultError", "build_tables", "load_published", "load_results", "paper_savings", "plot_figures",
           "setting_label", "summarise", "target_savings_for"]
