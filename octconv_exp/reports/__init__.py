"""Sweep reports: the summaries, figures and Pareto front of a sweep dir (report.py), and the
paper-ready outputs built on them: confidence intervals (stats.py), point labels kept apart
(labels.py) and the LaTeX table (latex.py)."""
