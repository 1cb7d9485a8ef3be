"""What a run writes: atomic outputs, metrics.json, the loggers (CSV, TensorBoard, MLflow), the
provenance of the code that wrote a record. May import models, data and errors.
"""
