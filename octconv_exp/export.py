"""``python -m octconv_exp.export RUN_DIR --format torchscript|onnx [--out PATH] [--opset N]``:
the run's model as a TorchScript or ONNX file, checked on the run's test set
(:mod:`octconv_exp.deploy.export`; docs/runs.md, "Deploying a model")."""
import sys

from .deploy.export import main

if __name__ == "__main__":
    sys.exit(main())
