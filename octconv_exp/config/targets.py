"""Which code a config read from a checkpoint may name.

A checkpoint's config is data: a file someone else wrote (or edited after loading it with
``weights_only=True``) must not choose a function for us to call. So a ``_target_`` taken from
a checkpoint is called only when it is one of the package's own classes of its kind (a model
of octconv_exp; an optimizer or schedule of torch.optim, PopTorch or octconv_exp), or when
this command line names it itself (``model._target_=my_research.TinyNet``): then the user,
not the file, chose it. A nested ``_target_`` (Hydra would instantiate it too) must always be
named by the command line.
"""
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from ..errors import UserError
from ..models.octave import model_class

PACKAGE = "octconv_exp."
#: What each node's ``_target_`` may be when it comes from a checkpoint, in words.
OWN_KINDS = {"model": "one of octconv_exp's models",
             "optimizer": "a torch.optim (or poptorch.optim) optimizer",
             "scheduler": "a torch.optim.lr_scheduler or octconv_exp schedule",
             "dataset": "one of octconv_exp's data sets (a data set class is always your own)"}


def trusted_model_target(target):
    """Is ``target`` a model class of this package (what build_model may call unasked)?"""
    if not isinstance(target, str) or not target.startswith(PACKAGE):
        return False
    try:
        cls = model_class({"_target_": target})
    except ValueError:
        return False
    return (isinstance(cls, type) and issubclass(cls, nn.Module)
            and cls.__module__.startswith(PACKAGE))


def _located(target, prefixes):
    """What Hydra's instantiate would call for ``target`` (it walks attributes too, so a
    prefix alone proves nothing), or None when that cannot be imported (then nothing runs:
    the run reports it when it builds the part). False: outside ``prefixes``."""
    if not isinstance(target, str) or not target.startswith(prefixes):
        return False
    # What hydra.utils.instantiate resolves with; here, not at the top: load_model, which
    # checks only models, needs no Hydra.
    from hydra._internal.utils import _locate

    try:
        return _locate(target)
    except (ImportError, AttributeError, ValueError):
        return None


def trusted_optimizer_target(target):
    found = _located(target, ("torch.optim.", "poptorch.optim.", PACKAGE))
    if found is None:
        return True
    return isinstance(found, type) and issubclass(found, torch.optim.Optimizer)


def trusted_scheduler_target(target):
    found = _located(target, ("torch.optim.lr_scheduler.", PACKAGE))
    if found is None:
        return True
    return (isinstance(found, type) and hasattr(found, "step")
            and found.__module__.startswith(("torch.optim.", PACKAGE)))


TRUSTED = {"model": trusted_model_target, "optimizer": trusted_optimizer_target,
           "scheduler": trusted_scheduler_target, "dataset": lambda target: False}


def _targets(node, where):
    """``(key, target)`` of every ``_target_`` in a config node, nested ones included."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{where}.{key}"
            if key == "_target_":
                yield path, value
            else:
                yield from _targets(value, path)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _targets(value, f"{where}.{i}")


def _select(container, key):
    node = container
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def named_by_command(key, target, command, explicit):
    """Did this command line set ``key`` (or a node above it) to ``target`` itself?"""
    return (any(key == k or key.startswith(k + ".") for k in explicit)
            and _select(command, key) == target)


def check_saved_targets(cfg, command_cfg, state, explicit, path, mode):
    """Refuse (UserError, one line) a ``_target_`` that the config ``cfg`` took from the
    checkpoint ``state`` at ``path`` and that is neither the package's own nor named by this
    command (``command_cfg``, whose keys ``explicit`` lists). ``mode``: what the command does
    (``resume=true``, ``train=false``), for the message."""
    if not isinstance(state.get("config"), dict):
        return  # no saved config: every value is this command's own

    def plain(c):
        return OmegaConf.to_container(c, resolve=True) if isinstance(c, DictConfig) else c

    effective, command = plain(cfg), plain(command_cfg)
    for name, trusted in TRUSTED.items():
        for key, target in _targets(effective.get(name), name):
            if named_by_command(key, target, command, explicit):
                continue
            nested = key != f"{name}._target_"
            if not nested and trusted(target):
                continue
            why = ("a nested _target_, which would be instantiated too" if nested
                   else f"not {OWN_KINDS[name]}")
            raise UserError(
                f"{mode}: {path} names {key}={target} in its config ({why}); a config read from "
                f"a checkpoint is data and chooses no code to run: if you trust {target}, name "
                f"it on this command line ({key}={target})")


def user_targets(cfg):
    """``(key, target)`` of the top-level ``_target_``s of ``cfg`` that a resume must name on
    its command line: a model or data set class of the user's own."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    named = []
    for name in ("model", "dataset"):
        node = plain.get(name) if isinstance(plain, dict) else None
        target = node.get("_target_") if isinstance(node, dict) else None
        if target is not None and not TRUSTED[name](target):
            named.append((f"{name}._target_", target))
    return named
