"""Reporting: the paper's Tables I-V (`tables`: data; `render`: Markdown, LaTeX, CSV; `report`: the files), the
fidelity report, the cost and coverage notes and Figures 2-7, from the run folders of the pipeline grid.

It stands on the grid (`har.pipeline.grid`: which runs exist and which tables each serves) and on the paper's numbers
(`har.published`); only the reference runs' rebuild (`har.reference`) stands on it.
"""
