"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the model, optimizer and scheduler states, the Python, NumPy and torch RNG
states, the training loader's shuffling state, the epochs completed with their metrics and,
when a run was interrupted inside an epoch, how far it got (steps and running sums) so that
a resumed run sees the same batches in the same order as an uninterrupted one.

Files (atomic writes): ``<run dir>/checkpoints/last.pt`` after every epoch (and on
interruption), ``best.pt`` when the monitored metric improves (trainer.early_stopping.monitor
and mode; by default the validation accuracy when the run has a validation split
(``dataset.val_size``), else the training loss). Both hold the monitor's name (``monitor``),
its direction (``mode``) and its best value so far (``best``).

Every checkpoint and ``model.pt`` also carries what reusing the model needs
(:func:`inference_record`, under ``"inference"``): the normalisation it was trained with, its
class names, input shape and how to build it. Evaluation and resume take the normalisation
from there, never from the data as it is today.

Everything in them is a tensor or a plain Python value (the NumPy RNG state is stored as a
tensor and numbers), so they load with ``torch.load(..., weights_only=True)`` on every torch
from 2.0.1 on: a checkpoint from someone else cannot run code when it is read.
"""
import os
import pickle
import random
import re
import shutil
import warnings

import numpy as np
import torch
from omegaconf import OmegaConf

from ..errors import UserError
from ..models.octave import model_name, model_node
from ..models.spec import LEGACY_MODEL_TARGETS
from ..records.outputs import atomic_write, save_torch_atomic
from .loop import improves, natural_mode

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
# What must match between a checkpoint and the run that loads it.
IDENTITY_KEYS = ("model", "conv", "alpha", "expansion", "num_classes")


def rng_state():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            # No NumPy array: weights_only loading accepts tensors and plain values only.
            "numpy": (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos),
                      int(has_gauss), float(cached)),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy().astype(np.uint32)
    np.random.set_state((name, keys, pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def identity(cfg, num_classes):
    return {"model": model_name(cfg), "conv": cfg.conv.mode, "alpha": float(cfg.alpha),
            "expansion": int(cfg.expansion), "num_classes": int(num_classes)}


#: Where a checkpoint or model.pt keeps its :func:`inference_record`.
INFERENCE = "inference"


def inference_record(cfg, data):
    """What using the model needs besides its weights, as plain values: the normalisation
    (``mean``, ``std`` of the images scaled to [0, 1]), ``class_names``, ``input_shape``
    (channels, height, width), the model's ``model_name`` and its constructor config
    (``model``: the model node; ``conv_mode``, ``alpha``, ``expansion``, ``num_classes``,
    ``label_smoothing``: what :func:`~octconv_exp.models.octave.build_model` offers it)."""
    trainer = cfg.get("trainer") or {}
    return {"mean": [float(m) for m in data.mean], "std": [float(s) for s in data.std],
            "class_names": [str(c) for c in data.train.classes],
            "input_shape": [int(d) for d in data.image_shape],
            "model_name": model_name(cfg),
            "model": OmegaConf.to_container(OmegaConf.create(model_node(cfg)), resolve=True),
            "conv_mode": str(cfg.conv.mode), "alpha": float(cfg.alpha),
            "expansion": int(cfg.expansion), "num_classes": len(data.train.classes),
            "label_smoothing": float(trainer.get("label_smoothing", 0.0) or 0.0)}


def saved_preprocessing(state):
    """``{"stats": (mean, std), "classes": [...]}`` a checkpoint recorded, for
    :func:`~octconv_exp.data.loading.load_data`; None for a file from before the record."""
    record = state.get(INFERENCE)
    if not isinstance(record, dict) or "mean" not in record or "std" not in record:
        return None
    return {"stats": (tuple(record["mean"]), tuple(record["std"])),
            "classes": record.get("class_names")}


def check_identity(saved, cfg, num_classes, path):
    """Refuse a checkpoint of another model, naming what differs."""
    wanted = identity(cfg, num_classes)
    if saved.get("conv") == "vanilla" and wanted["conv"] == "vanilla":
        wanted["alpha"] = saved.get("alpha")  # vanilla ignores alpha
    if saved.get("model") == model_name(cfg, legacy=True):
        # Written before a user model was named by its class (its name then: the YAML's
        # leftover seed_cnn, or the bare class name): the same model.
        wanted["model"] = saved["model"]
    differs = [k for k in IDENTITY_KEYS if k in saved and saved[k] != wanted[k]]
    if differs:
        have = ", ".join(f"{k}={saved[k]}" for k in differs)
        want = ", ".join(f"{k}={wanted[k]}" for k in differs)
        raise UserError(f"checkpoint {path} is of another model ({have}; this run has {want}); "
                        "use the settings it was trained with or another checkpoint")


def resolve_path(path, prefer_final=False):
    """A checkpoint file, or a run dir: its checkpoints/last.pt, else model.pt (the other way
    round with ``prefer_final``, for evaluation)."""
    candidates = [path]
    if os.path.isdir(path):
        candidates = [os.path.join(path, CHECKPOINT_DIR, LAST), os.path.join(path, "model.pt")]
        if prefer_final:
            candidates.reverse()
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise UserError(f"no checkpoint at {os.path.abspath(path)} (looked for "
                    + ", ".join(os.path.abspath(c) for c in candidates) + ")")


def load(path):
    """A checkpoint or model file, read with ``weights_only=True``: tensors and plain values
    only, so a crafted file cannot execute code; anything else is one clear UserError."""
    where = os.path.abspath(path)
    try:
        with warnings.catch_warnings():
            # torch 2.0.1's weights-only reader touches TypedStorage and warns about it.
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # A class or function the file wants to call (2.0.1: "Unsupported class x.y";
        # newer: "unsupported GLOBAL x.y"); anything else is a damaged pickle stream.
        if re.search(r"unsupported (class|global)", str(exc), re.IGNORECASE):
            raise UserError(
                f"refusing to load {where}: it holds Python objects that only an arbitrary-code "
                "pickle can rebuild (not an octconv-exp checkpoint, or one from before safe "
                "loading); octconv-exp loads tensors and plain values only") from None
        raise UserError(f"{where} is corrupt ({_first_line(exc)})" + _way_back(path)) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        what = "is empty" if size == 0 else f"is truncated or corrupt ({size} bytes)"
        raise UserError(f"{where} {what}: {_first_line(exc)}" + _way_back(path)) from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserError(f"cannot read checkpoint {where}: "
                        f"{type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise UserError(f"{os.path.abspath(path)} is not an octconv-exp checkpoint or model file")
    if isinstance(state.get("config"), dict):
        state["config"] = _current_targets(state["config"])
    return state


#: The package's classes a config may name, by the paths they had before the package had
#: subpackages (issue 28): checkpoints and model files written then name them so.
LEGACY_TARGETS = dict(LEGACY_MODEL_TARGETS, **{
    "octconv_exp.schedules.WarmupMultiStepLR": "octconv_exp.training.schedules.WarmupMultiStepLR"})


def _current_targets(node):
    """``node`` (a saved config) with every ``_target_`` of :data:`LEGACY_TARGETS` renamed."""
    if isinstance(node, dict):
        return {key: (LEGACY_TARGETS.get(value, value) if key == "_target_" and isinstance(value, str)
                      else _current_targets(value)) for key, value in node.items()}
    if isinstance(node, list):
        return [_current_targets(value) for value in node]
    return node


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _way_back(path):
    """The way back from a damaged last.pt: its best.pt, when there is one."""
    best = os.path.join(os.path.dirname(os.path.abspath(path)), BEST)
    if os.path.basename(path) == LAST and os.path.isfile(best):
        return f"; the best epoch's checkpoint is intact: resume from it with ckpt_path={best}"
    return ""


def monitor_for(cfg):
    """What best.pt follows: ``trainer.early_stopping.monitor``, by default (null)
    ``val_accuracy`` when the run holds out a validation split (dataset.val_size > 0), else
    ``train_loss``."""
    try:
        chosen = OmegaConf.select(cfg, "trainer.early_stopping.monitor", default=None)
        if chosen is not None:
            return str(chosen)
        return "val_accuracy" if float(cfg.dataset.get("val_size", 0) or 0) > 0 else "train_loss"
    except (TypeError, ValueError, AttributeError):  # a config that failed validation
        return "train_loss"


def mode_for(cfg, monitor):
    """Which way ``monitor`` is better: ``trainer.early_stopping.mode`` when the config
    chose ``monitor`` itself, else max for an accuracy and min for a loss."""
    try:
        mode = OmegaConf.select(cfg, "trainer.early_stopping.mode", default=None)
        chosen = OmegaConf.select(cfg, "trainer.early_stopping.monitor", default=None)
    except (TypeError, ValueError, AttributeError):
        mode = chosen = None
    if mode in ("max", "min") and chosen in (None, monitor):
        return str(mode)
    return natural_mode(monitor)


class Checkpointer:
    """Writes last.pt (and best.pt) into the run dir. ``monitor``: the metric best.pt follows,
    ``mode`` which way is better (default: higher for accuracies, lower for losses); a tie is
    no improvement."""

    def __init__(self, output_dir, monitor="train_loss", mode=None):
        self.dir = os.path.join(output_dir, CHECKPOINT_DIR)
        self.monitor = monitor
        self.mode = mode or natural_mode(monitor)
        self.best = None

    @property
    def last_path(self):
        return os.path.join(self.dir, LAST)

    @property
    def best_path(self):
        return os.path.join(self.dir, BEST)

    def save(self, state, metric=None):
        """Write last.pt; also best.pt when ``metric`` (None: inside an epoch) improves."""
        if os.path.exists(self.dir) and not os.path.isdir(self.dir):
            raise UserError(f"{self.dir} is a file, and checkpoints need a folder there: move "
                            "it away, or run with trainer.checkpoint=false")
        os.makedirs(self.dir, exist_ok=True)
        improved = metric is not None and self._improves(metric)
        if improved:
            self.best = metric
        save_torch_atomic(self.last_path, dict(state, best=self.best, monitor=self.monitor,
                                               mode=self.mode))
        if improved:
            with open(self.last_path, "rb") as src:
                atomic_write(self.best_path, lambda f: shutil.copyfileobj(src, f))

    def follows(self, state):
        """Whether checkpoint ``state`` kept its best by this monitor and mode (checkpoints
        from before validation splits name no monitor: they followed the training loss)."""
        monitor = state.get("monitor", "train_loss")
        return monitor == self.monitor and state.get("mode", natural_mode(monitor)) == self.mode

    def _improves(self, metric):
        return improves(metric, self.best, self.mode)
