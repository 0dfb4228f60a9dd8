"""Reporting: the paper's Tables I-V and Figures 2-7 from the run folders of the pipeline grid."""

from har.reporting.figures import plot_figures
from har.reporting.results import ResultError, load_results, setting_label, summarise
from har.reporting.tables import build_tables, load_published

__all__ = ["ResultError", "build_tables", "load_published", "load_results", "plot_figures", "setting_label",
           "summarise"]
