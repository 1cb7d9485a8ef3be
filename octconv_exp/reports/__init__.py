"""What is read back from run dirs for people: the sweep report (summary tables, figures, Pareto
front) and the side-by-side comparison of runs (``compare``). May import sweeps, training,
config, backends, records, models, data and errors; nothing imports it but cli and the entry
modules.
"""
