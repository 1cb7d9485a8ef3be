"""What is read back from run dirs for people: the sweep report (summary, figures, Pareto front;
report.py), the paper-ready outputs built on it (confidence intervals, stats.py; point labels
kept apart, labels.py; the LaTeX table, latex.py) and the side-by-side comparison of runs
(compare.py, ``python -m octconv_exp.compare``)."""
