"""What is read back from run dirs for people: the sweep report (summary, figures, Pareto front)
and the side-by-side comparison of runs (``python -m octconv_exp.compare``)."""
