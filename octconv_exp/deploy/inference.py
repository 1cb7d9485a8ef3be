"""Use a trained model outside the framework: ``octconv_exp.load_model(run_dir_or_file)``.

A run dir's ``model.pt`` (or any checkpoint) records how its images were normalised, its class
names, input shape and how to build the model (:func:`~octconv_exp.training.checkpoint.inference_record`),
so the model predicts exactly as the run evaluated it, whatever its data set holds today, with
no Hydra config to compose::

    import octconv_exp
    model = octconv_exp.load_model("outputs/2026-12-06/10-00-00_123")
    indices, names = model.predict(images)   # uint8 (N, C, H, W) or (C, H, W), or floats in [0, 1]
"""
from typing import List, NamedTuple, Optional

import torch
from omegaconf import OmegaConf

from ..config.targets import trusted_model_target
from ..data.datasets import Normalise
from ..errors import UserError
from ..models.octave import build_model
from ..training.checkpoint import INFERENCE, load, resolve_path


class Prediction(NamedTuple):
    indices: torch.Tensor  # (N,) int64 class indices
    names: List[str]  # the class name of each


class LoadedModel:
    """A saved model in eval mode with the preprocessing it was trained with.

    ``module``: the ``torch.nn.Module`` (``module(x)`` on normalised images gives the
    log-probabilities, or logits for a user model, of every class); ``class_names``; ``mean``
    and ``std`` (per channel, of images scaled to [0, 1]); ``input_shape`` (channels, height,
    width); ``model_name``; ``path`` (the file read)."""

    def __init__(self, module, record, path, device="cpu"):
        self.module = module
        self.path = path
        self.device = torch.device(device)
        self.class_names = list(record["class_names"])
        self.mean = [float(m) for m in record["mean"]]
        self.std = [float(s) for s in record["std"]]
        self.input_shape = tuple(int(d) for d in record["input_shape"])
        self.model_name = record.get("model_name")
        # The training loader's own normalisation, so uint8 images give the very same inputs.
        self._normalise = Normalise(self.mean, self.std, device=self.device)

    def preprocess(self, images):
        """``images`` as the model's input: a batch (N, C, H, W) or one image (C, H, W), uint8
        (0-255) or floating point (0-1), a tensor or a NumPy array, normalised as in training."""
        x = torch.as_tensor(images)
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"images of shape {tuple(torch.as_tensor(images).shape)}: this model "
                             f"takes (N, {', '.join(map(str, self.input_shape))}) or "
                             f"({', '.join(map(str, self.input_shape))})")
        x = x.to(self.device)
        if x.dtype == torch.uint8:
            return self._normalise(x)
        if not x.is_floating_point():
            raise ValueError(f"images of dtype {x.dtype}: give uint8 (0-255) or floats (0-1)")
        return self._normalise(x.to(torch.float32) * 255.0)

    def scores(self, images, batch_size=256):
        """The model's output for every image (N, classes), in batches of ``batch_size``."""
        x = self.preprocess(images)
        with torch.no_grad():
            return torch.cat([self.module(x[i:i + batch_size])
                              for i in range(0, x.shape[0], batch_size)])

    def predict(self, images, batch_size=256):
        """The class of every image: ``Prediction(indices, names)``."""
        indices = self.scores(images, batch_size).argmax(dim=1).cpu()
        return Prediction(indices, [self.class_names[i] for i in indices.tolist()])

    def __repr__(self):
        return (f"LoadedModel({self.model_name}, input {self.input_shape}, "
                f"{len(self.class_names)} classes, from {self.path})")


def load_model(path, device="cpu", trust_target: Optional[str] = None):
    """The model of a run dir (its ``model.pt``, else ``checkpoints/last.pt``) or of a model or
    checkpoint file, in eval mode with its preprocessing, as a :class:`LoadedModel`.

    The file is read with ``torch.load(weights_only=True)`` and names no code: only the
    package's own models are built from it. A model of your own is built only when you name
    its class as ``trust_target`` (``"my_research.TinyNet"``), as ``model._target_=...`` on a
    command line allows it. A file from before the preprocessing record, or one refused, is a
    :class:`~octconv_exp.errors.UserError`."""
    where = resolve_path(str(path), prefer_final=True)
    state = load(where)
    record = state.get(INFERENCE)
    if not isinstance(record, dict):
        raise UserError(f"{where} records no preprocessing (written by an older octconv-exp): "
                        "evaluate it with run.py train=false ckpt_path=..., or load a model "
                        "saved since")
    node = dict(record["model"])
    target = node.get("_target_")
    if target != trust_target and not trusted_model_target(target):
        raise UserError(f"{where} names model._target_={target}, not one of octconv_exp's "
                        f"models; a saved file chooses no code to run: if you trust it, "
                        f"pass load_model(..., trust_target={str(target)!r})")
    cfg = OmegaConf.create({"model": node, "conv": {"mode": record["conv_mode"]},
                            "alpha": record["alpha"], "expansion": record["expansion"],
                            "trainer": {"label_smoothing": record.get("label_smoothing", 0.0)}})
    try:
        module = build_model(cfg, num_classes=int(record["num_classes"]))
        module.load_state_dict(state["state_dict"])
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"{where}: the model cannot be rebuilt: "
                        + " ".join(str(exc).split())[:300]) from None
    module.to(device).eval()
    return LoadedModel(module, record, where, device=device)
