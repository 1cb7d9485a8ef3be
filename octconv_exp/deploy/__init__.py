"""Using a trained run outside the framework: ``load_model(run_dir)`` and the TorchScript/ONNX
export (``export``). May import training (checkpoints), config, backends, records, models, data
and errors.
"""
