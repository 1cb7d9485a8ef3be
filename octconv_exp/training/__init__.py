"""One run's life: the runner, the epoch loop, checkpoints, resume, stopping on a signal,
learning-rate schedules, and the lock on a run dir. May import config, backends, records,
models, data and errors.
"""
