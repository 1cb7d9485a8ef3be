"""The seed's CIFAR-10 classifier, with vanilla, octave or multi-octave convolutions.

``ClassificationModel`` reproduces Graphcore's ``octconv_example.py`` layer for layer (the
parameter names too, so weights move between the two): three conv -> BatchNorm -> ReLU ->
MaxPool blocks (multi-octave on CPU/GPU pools before the ReLU: the same values and
gradients, see :class:`FusedOctaveBlock`), then Linear -> LogSoftmax. ``forward(x, labels)``
returns ``(log_probs, loss)``: the loss is computed inside the model because PopTorch requires
it, and so every backend runs the same training loop.
"""
import contextlib
import importlib
import inspect
import sys
from typing import Callable, ContextManager, Optional

import octconv
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from . import batchnorm
from .spec import LEGACY_MODEL_TARGETS, OCTAVE_BRANCHES, recorded_model_name, split_high_low


def make_conv_block(in_channels, out_channels):
    """conv -> batchnorm -> relu -> maxpool, as the seed's createConvBlock."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


def check_octave_split(in_channels, out_channels, alpha_in, alpha_out):
    """Refuse what octconv.OctConv2d silently gets wrong: alpha 1 and empty branches."""
    for what, channels, a in (("input", in_channels, alpha_in), ("output", out_channels, alpha_out)):
        if not 0 <= a < 1:
            raise ValueError(f"octave convolution {what} alpha must be in [0, 1), got {a}")
        high, low = split_high_low(channels, a)
        if high == 0 or (a > 0 and low == 0):
            raise ValueError(
                f"octave convolution {what} alpha={a} splits {channels} channels into {high} "
                f"high- and {low} low-frequency channels; an active branch needs at least one")


class FusedOctConv2d(octconv.OctConv2d):
    """Octave convolution computed with as few, as large convolutions as possible.

    The same mathematics and the same parameters (``conv_h2h``, ``conv_h2l``, ``conv_l2h``,
    ``conv_l2l``) as ``octconv.OctConv2d``, so state dicts are interchangeable, but the two
    convolutions that produce the low-frequency output run as one convolution over the
    concatenation of the pooled high input and the low input, with the two weights
    concatenated along the input-channel axis. An inner layer then costs three kernels
    (h2h at full resolution, [h2l|l2l] and l2h at half resolution) instead of four.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, alpha=0.5,
                 bias=False):
        alpha_in, alpha_out = alpha if isinstance(alpha, tuple) else (alpha, alpha)
        check_octave_split(in_channels, out_channels, alpha_in, alpha_out)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         alpha=alpha, bias=bias)

    @staticmethod
    def _bias(*convs):
        biases = [c.bias for c in convs if c is not None and c.bias is not None]
        return sum(biases) if biases else None

    def forward(self, x):
        x_h, x_l = x if isinstance(x, tuple) else (x, None)
        if self.stride == 2:
            x_h = F.avg_pool2d(x_h, 2)
        has_low_out = self.out_channels["low"] > 0
        y_h = F.conv2d(x_h, self.conv_h2h.weight, self.conv_h2h.bias, padding=self.padding)
        y_l = None
        if x_l is None:
            if has_low_out:
                y_l = self.conv_h2l(F.avg_pool2d(x_h, 2))
        else:
            if has_low_out:
                x_l2l = F.avg_pool2d(x_l, 2) if self.stride == 2 else x_l
                low_in = torch.cat([F.avg_pool2d(x_h, 2), x_l2l], dim=1)
                weight = torch.cat([self.conv_h2l.weight, self.conv_l2l.weight], dim=1)
                y_l = F.conv2d(low_in, weight, self._bias(self.conv_h2l, self.conv_l2l),
                               padding=self.padding)
            y_l2h = self.conv_l2h(x_l)
            if self.stride == 1 and y_h.shape[-2:] != y_l2h.shape[-2:]:
                y_l2h = F.interpolate(y_l2h, size=y_h.shape[-2:])
            # In place: the convolution's backward does not need its output. (A broadcast add
            # over 2x2 blocks instead of the upsampling measured 1.5-7x slower forward and
            # backward in both memory formats: its backward is a strided reduction.)
            y_h = y_h.add_(y_l2h)
        return y_h if y_l is None else (y_h, y_l)


class OctaveBlock(nn.Module):
    """Octave convolution -> per-frequency BatchNorm -> ReLU -> MaxPool (the seed's OctConvBlock).

    ``parallel_scope``, when given, is called with the octave convolution and the context
    manager it returns is entered around the convolution, so that its branches run as one
    group (``poptorch.MultiConv`` on IPUs, configured for the branches this layer has).
    """

    def __init__(self, in_channels, out_channels, alpha, conv_cls=octconv.OctConv2d,
                 parallel_scope: Optional[Callable[[nn.Module], ContextManager]] = None):
        super().__init__()
        alpha_in, alpha_out = alpha
        check_octave_split(in_channels, out_channels, alpha_in, alpha_out)
        self.octconv = conv_cls(in_channels, out_channels, kernel_size=3, padding=1, alpha=alpha)
        self.parallel_scope = parallel_scope
        relu = nn.ReLU()
        pool = nn.MaxPool2d(2)
        self.high_seq = nn.Sequential(nn.BatchNorm2d(self.octconv.out_channels["high"]), relu,
                                      pool)
        self.has_low = self.octconv.alpha_out > 0.0
        if self.has_low:
            self.low_seq = nn.Sequential(nn.BatchNorm2d(self.octconv.out_channels["low"]), relu,
                                         pool)

    def forward(self, x):
        scope = (self.parallel_scope(self.octconv) if self.parallel_scope is not None
                 else contextlib.nullcontext())
        with scope:
            out = self.octconv(x)
        if self.has_low:
            y_high, y_low = out
            return self.high_seq(y_high), self.low_seq(y_low)
        return self.high_seq(out)


class FusedOctaveBlock(OctaveBlock):
    """The octave block as ``conv=multi-octave`` runs it on CPU/GPU: :class:`FusedOctConv2d`,
    then per frequency BatchNorm -> MaxPool -> ReLU (in place).

    The same modules and state dict as :class:`OctaveBlock`, and the same values and gradients:
    ReLU is monotone, so ``max(relu(a), relu(b)) = relu(max(a, b))``, and the max-pool picks
    the same element either way (where every element of a window is <= 0 both give 0 and a
    zero gradient). Pooling first runs the ReLU and its backward on a quarter of the elements
    (measured: README, Performance). BatchNorm over few channels (not a multiple of 16) in
    channels-last memory runs as :func:`octconv_exp.models.batchnorm.batch_norm`."""

    def __init__(self, in_channels, out_channels, alpha):
        super().__init__(in_channels, out_channels, alpha, conv_cls=FusedOctConv2d)

    @staticmethod
    def _finish(seq, y):
        bn, _, pool = seq
        return F.relu_(pool(batchnorm.batch_norm(bn, y)))

    def forward(self, x):
        out = self.octconv(x)
        if self.has_low:
            return self._finish(self.high_seq, out[0]), self._finish(self.low_seq, out[1])
        return self._finish(self.high_seq, out)


class ClassificationModel(nn.Module):
    """CNN classifier for 3x32x32 images; width 16 * expansion channels.

    conv_mode: "vanilla" (nn.Conv2d), "octave" (octconv.OctConv2d) or "multi-octave" (the
    octave convolutions of each layer as one parallel group: ``parallel_scope`` on IPUs,
    :class:`FusedOctaveBlock` elsewhere).
    """

    #: The input size the classifier is built for (three 2x2 max-pools down to 4x4).
    input_size = 32

    def __init__(self, conv_mode="vanilla", alpha=0.5, expansion=1, num_classes=10,
                 parallel_scope: Optional[Callable[[nn.Module], ContextManager]] = None,
                 label_smoothing=0.0):
        super().__init__()
        if not isinstance(expansion, int) or expansion < 1:
            raise ValueError(f"expansion must be a positive integer, got {expansion!r}")
        self.conv_mode = conv_mode
        self.alpha = alpha
        self.num_channels = c = 16 * expansion
        if conv_mode == "vanilla":
            self.convlayers = nn.Sequential(make_conv_block(3, c), make_conv_block(c, 2 * c),
                                            make_conv_block(2 * c, c))
        elif conv_mode in ("octave", "multi-octave"):
            fused = conv_mode == "multi-octave" and parallel_scope is None
            if conv_mode == "octave":
                parallel_scope = None

            def block(cin, cout, a):
                if fused:
                    return FusedOctaveBlock(cin, cout, a)
                return OctaveBlock(cin, cout, a, conv_cls=octconv.OctConv2d,
                                   parallel_scope=parallel_scope)

            self.convlayers = nn.Sequential(block(3, c, (0.0, alpha)), block(c, 2 * c, (alpha, alpha)),
                                            block(2 * c, c, (alpha, 0.0)))
        else:
            raise ValueError(f"conv_mode must be vanilla, octave or multi-octave, got {conv_mode!r}")
        self.fc = nn.Linear(c * 4 * 4, num_classes)
        self.log_softmax = nn.LogSoftmax(dim=1)
        # The seed's NLLLoss; with label smoothing the same cross-entropy (log_softmax of
        # log-probabilities is the identity), smoothed. Neither has parameters.
        self.loss = (nn.NLLLoss() if not label_smoothing
                     else nn.CrossEntropyLoss(label_smoothing=float(label_smoothing)))
        self.label_smoothing = float(label_smoothing)

    def forward(self, x, labels=None):
        out = self.convlayers(x)
        out = torch.flatten(out, start_dim=1)
        out = self.log_softmax(self.fc(out))
        if labels is None:
            return out
        if self.label_smoothing and poptorch_traces():
            return out, ipu_loss(smoothed_nll(out, labels, self.label_smoothing))
        return out, self.loss(out, labels)


def poptorch_traces():
    """True while PopTorch runs a model for an IPU (poptorch.isRunningOnIpu), without importing
    it where nothing has (CPU/GPU runs)."""
    poptorch = sys.modules.get("poptorch")
    return poptorch is not None and poptorch.isRunningOnIpu()


def smoothed_nll(log_probs, labels, label_smoothing):
    """torch's label-smoothed cross-entropy of log-probabilities from explicit ops:
    ``(1 - eps) * nll + eps * mean(-log_probs)`` (CrossEntropyLoss(label_smoothing) to float
    rounding). PopTorch sees CrossEntropyLoss only decomposed, and marks just its NLL part as
    a loss: the smoothing term would be reported but not trained (issue 26, docs/ipu.md)."""
    nll = F.nll_loss(log_probs, labels)
    return (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean()


def ipu_loss(loss):
    """The loss PopTorch trains: the NLL part's own identity loss becomes part of this one
    (RemoveSurplusIdentityLosses.cpp), so the whole smoothed loss gets its gradient."""
    return sys.modules["poptorch"].identity_loss(loss, reduction="none")


def octave_branches(conv):
    """The branches an octave convolution has, in the order octconv executes them."""
    return [name for name in OCTAVE_BRANCHES if getattr(conv, "conv_" + name) is not None]


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


class WithLoss(nn.Module):
    """A plain classifier (``forward(x)`` returns logits) with its loss computed inside
    ``forward(x, labels)``, as PopTorch requires and every backend's loop expects:
    ``(logits, cross-entropy)``, or the logits alone without labels."""

    def __init__(self, net, label_smoothing=0.0):
        super().__init__()
        self.net = net
        self.loss = nn.CrossEntropyLoss(label_smoothing=float(label_smoothing))
        self.label_smoothing = float(label_smoothing)

    def forward(self, x, labels=None):
        out = self.net(x)
        if labels is None:
            return out
        if self.label_smoothing and poptorch_traces():
            log_probs = F.log_softmax(out, dim=1)
            return out, ipu_loss(smoothed_nll(log_probs, labels, self.label_smoothing))
        return out, self.loss(out, labels)


#: What build_model offers a model's constructor, each when the constructor takes it.
OFFERED_ARGUMENTS = ("conv_mode", "alpha", "num_classes", "expansion", "parallel_scope",
                     "label_smoothing")
SEED_MODEL = {"_target_": "octconv_exp.models.octave.ClassificationModel", "name": "seed_cnn"}


def model_node(cfg):
    """The ``model`` config node as a plain dict (the seed's CNN for configs from before the
    model group existed)."""
    node = cfg.get("model") if hasattr(cfg, "get") else None
    if node is None:
        return dict(SEED_MODEL)
    return OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else dict(node)


def model_class(node):
    """The class (or factory) ``model._target_`` names; ValueError naming it if it cannot be
    imported."""
    target = node.get("_target_")
    target = LEGACY_MODEL_TARGETS.get(target, target) if isinstance(target, str) else target
    module, _, name = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"model._target_={target} cannot be imported ({exc}); name a class "
                         "as package.module.Class, importable from where run.py starts") from None


def model_name(cfg, legacy=False):
    """The model as the run's record names it: ``seed_cnn``, ``resnet_cifar-20``,
    ``resnet_imagenet-50`` (with ``-w2`` for width 2), or a user model's ``model.name``, else
    its class (``module.Class``): :func:`recorded_model_name`."""
    return recorded_model_name(model_node(cfg), legacy=legacy)


def _takes_labels(model):
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


class ModelConstructorError(ValueError):
    """A user model's ``__init__`` raised (anything but the ValueError and TypeError that
    :func:`build_model` reports as wrong arguments)."""


def build_model(cfg, num_classes=10, parallel_scope=None):
    """The model a composed config describes (``parallel_scope``: the IPU backend's MultiConv).

    ``model._target_`` is called with the model node's own arguments (depth, width, ...) and,
    among conv_mode, alpha, num_classes, expansion, parallel_scope and label_smoothing, those
    its signature takes. A model whose ``forward`` takes only ``x`` is a plain classifier
    returning logits: it is wrapped in :class:`WithLoss`. A model that cannot take conv_mode
    is refused for an octave conv mode (it would silently train vanilla)."""
    node = model_node(cfg)
    cls = model_class(node)
    kwargs = {k: v for k, v in node.items() if k not in ("_target_", "name")}
    trainer = cfg.get("trainer") if hasattr(cfg, "get") else None
    offered = {"conv_mode": cfg.conv.mode, "alpha": float(cfg.alpha), "num_classes": num_classes,
               "expansion": int(cfg.expansion), "parallel_scope": parallel_scope,
               "label_smoothing": float((trainer or {}).get("label_smoothing", 0.0) or 0.0)}
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    any_keyword = any(p.kind == p.VAR_KEYWORD for p in params.values())
    for key, value in offered.items():
        if key in kwargs:
            continue
        if key in params or any_keyword:
            if key == "parallel_scope" and value is None and key not in params:
                continue
            kwargs[key] = value
        elif key == "conv_mode" and value != "vanilla":
            raise ValueError(f"model {node.get('_target_')} takes no conv_mode argument, so it "
                             f"cannot be built with conv={value}; give its constructor "
                             "conv_mode (and alpha), or use conv=vanilla")
    try:
        model = cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"model {node.get('_target_')}: {exc}") from None
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user's constructor may raise anything
        if str(node.get("_target_")).startswith("octconv_exp."):
            raise  # our own models: a bug, with its traceback
        raise ModelConstructorError(
            f"model._target_={node.get('_target_')}: its constructor raised "
            f"{type(exc).__name__}: {' '.join(str(exc).split()) or '(no message)'}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model._target_={node.get('_target_')} returned a "
                         f"{type(model).__name__}, not a torch.nn.Module")
    if not _takes_labels(model):
        model = WithLoss(model, label_smoothing=offered["label_smoothing"])
    return model


def check_input_size(model, image_shape):
    """Refuse an input size the model cannot take, in one line, before training starts."""
    net = model.net if isinstance(model, WithLoss) else model
    fixed = getattr(net, "input_size", None)
    if fixed is not None and tuple(image_shape[-2:]) != (fixed, fixed):
        raise ValueError(f"takes {fixed}x{fixed} images only (its classifier is sized for them), "
                         f"and the data set has {image_shape[-2]}x{image_shape[-1]}; use "
                         "dataset.image_size=32, or model=resnet_cifar / resnet_imagenet, which "
                         "take any size")
    smallest = getattr(net, "min_input_size", None)
    if smallest is not None and min(image_shape[-2:]) < smallest:
        raise ValueError(f"needs inputs of at least {smallest}x{smallest} in this conv mode, "
                         f"and the data set has {image_shape[-2]}x{image_shape[-1]}")


def octave_cost(alpha_in, alpha_out):
    """Cost of an octave convolution relative to a plain one with the same channels: the four
    branches, the ones touching the low-frequency half running at a quarter of the pixels.
    For alpha_in = alpha_out = a this is 1 - 3/4 * a * (2 - a)."""
    return ((1 - alpha_in) * (1 - alpha_out) + (1 - alpha_in) * alpha_out / 4
            + alpha_in * (1 - alpha_out) / 4 + alpha_in * alpha_out / 4)
