"""What a multirun is: the plan of its jobs (jobs.yaml, job names, deduplication) and the Optuna
search's objectives. May import training, config, backends, records, models, data and errors.
"""
