"""Deploying a trained model: reusing it in Python without Hydra (``load_model``, for now in
``octconv_exp.inference``) and exporting it as a self-contained TorchScript or ONNX file that
takes images and returns logits (:mod:`.export`), checked against the framework's own outputs
on the run's test set."""
