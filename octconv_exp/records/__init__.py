"""What a run leaves behind and how it is written: atomic writes and metrics.json, the run
dir's lock, the loggers, and the provenance of the code that produced a record."""
