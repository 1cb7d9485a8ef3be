"""Residual networks with vanilla, octave or multi-octave convolutions.

Two families, both plain classifiers (``forward(x)`` returns logits):

* :class:`ResNetCifar`: He et al. 2016's CIFAR networks (depth 6n+2: 20, 32, 44, 56, 110, ...),
  with projection shortcuts ("option B") wherever a block changes the shape.
* :class:`ResNetImageNet`: the bottleneck networks (depth 26, 50, 101, 152) in torchvision's
  v1.5 layout (the stride in the 3x3 convolution).

One ``conv_mode`` and one ``alpha`` pick the convolutions, as in :mod:`octconv_exp.models.octave`:

* ``"vanilla"``: ``nn.Conv2d`` everywhere (strided convolutions as torchvision has them);
* ``"octave"``: ``octconv.OctConv2d`` (a stride-2 octave convolution average-pools its input,
  then convolves with stride 1);
* ``"multi-octave"``: :class:`~octconv_exp.models.octave.FusedOctConv2d` (same parameters and state-dict
  names as ``OctConv2d``), or, when a ``parallel_scope`` is given (the IPU backend's
  ``poptorch.MultiConv`` factory), ``octconv.OctConv2d`` with ``parallel_scope(conv)`` entered
  around every octave convolution call, exactly as :class:`~octconv_exp.models.octave.OctaveBlock` does.

A convolution whose alpha_in and alpha_out are both 0 is an ordinary ``nn.Conv2d`` in every mode
(an octave convolution with no low-frequency side is one), except that in the octave modes a
stride-2 one is a :class:`PooledConv2d` (2x2 average pooling, then stride 1, as octconv strides),
so that odd sizes round down alike in both branches of a residual block. The ImageNet stem is
always a plain strided ``nn.Conv2d``. Octave placement follows the octave papers
(Chen et al. 2019; facebookresearch/OctConv; d-li14/octconv.pytorch ``oct_resnet.py``):

* CIFAR: the first convolution is (0, alpha), every other convolution, shortcuts included,
  (alpha, alpha), and the last block of the last stage ends the octave part: its second
  convolution is (alpha, 0). That block's input still has a low-frequency part which an identity
  shortcut cannot add to a high-only output, so its shortcut is a projection, an octave 1x1
  convolution (alpha, 0) + BatchNorm; with alpha > 0 the octave network therefore has one 1x1
  projection (out_ch^2 + 2 out_ch parameters) more than the vanilla one.
* ImageNet: the stem (7x7 convolution, BatchNorm, ReLU, 3x3 max-pool) is always vanilla; the
  first block of layer1 takes alpha_in = 0, the stages run at (alpha, alpha), the first block of
  layer4 has alpha_out = 0 (its 1x1 reduction and its projection shortcut take the low part in;
  its 3x3 and 1x1 expansion are vanilla) and the rest of layer4 is vanilla. Every convolution
  keeps its full weight (the four branches partition it), so the octave network has exactly the
  vanilla parameter count whenever alpha splits the channels exactly.

Inputs: any size for vanilla; in the octave modes (any alpha) at least 8 x 8 for CIFAR and
30 x 30 for ImageNet (``min_input_size``; smaller inputs are refused with a ValueError), odd
sizes included (octconv rounds down when it pools and upsamples to the high part's size).

Everything is built from small frequency-aware pieces (a value is a tensor, or a (high, low)
tuple): :func:`make_conv`, :class:`OctBatchNorm2d` / :func:`make_norm`, :class:`FreqReLU`,
:class:`FreqApply` (any parameter-free module per frequency), :func:`freq_add`,
:class:`FreqGlobalAvgPool`, and :class:`ConvBN` (convolution -> BatchNorm -> optional ReLU).

:meth:`ResNetCifar.conv_specs` / :meth:`ResNetImageNet.conv_specs` list every convolution and the
classifier as :class:`ConvSpec`; :func:`theoretical_flops_ratio` turns such a list into the
model's FLOPs relative to vanilla if channels split exactly by alpha.
"""
import contextlib
import math
from typing import Callable, ContextManager, List, NamedTuple, Optional, Sequence, Tuple, Union

import octconv
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import batchnorm
from .octave import FusedOctConv2d, check_octave_split, octave_cost

CONV_MODES = ("vanilla", "octave", "multi-octave")
CIFAR_EXAMPLE_DEPTHS = (20, 32, 44, 56, 110)
IMAGENET_LAYERS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}

ParallelScope = Optional[Callable[[nn.Module], ContextManager]]
Freq = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------- validation

def check_conv_mode(conv_mode):
    if conv_mode not in CONV_MODES:
        raise ValueError(f"conv_mode must be vanilla, octave or multi-octave, got {conv_mode!r}")


def check_alpha(alpha):
    if (not isinstance(alpha, (int, float)) or isinstance(alpha, bool)
            or not math.isfinite(alpha) or not 0 <= alpha < 1):
        raise ValueError(f"alpha must be a number in [0, 1), got {alpha!r}")


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------- layers

def is_octave(alpha_in, alpha_out):
    """Whether a convolution with these alphas has a low-frequency side at all."""
    return alpha_in > 0 or alpha_out > 0


class PooledConv2d(nn.Conv2d):
    """A stride-2 convolution computed as octconv computes its strided ones: 2x2 average pooling
    (floor), then the convolution at stride 1. Same parameters as ``nn.Conv2d``.

    An octave network's alpha (0, 0) convolutions with stride 2 are these, so that their output
    has the size of the octave convolutions beside them (ceil(H / 2) for a strided 3x3 against
    floor(H / 2) for octconv: odd sizes would not add up in a residual block), as d-li14's
    ``OctaveConv`` with alpha 0 does."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=2, padding=0, bias=False):
        if stride != 2:
            raise ValueError(f"PooledConv2d is for stride 2, got {stride}")
        super().__init__(in_channels, out_channels, kernel_size, stride=1, padding=padding,
                         bias=bias)
        self.pool_stride = stride

    def forward(self, x):
        return super().forward(F.avg_pool2d(x, self.pool_stride))


def make_conv(in_channels, out_channels, kernel_size, stride=1, alpha_in=0.0, alpha_out=0.0,
              conv_mode="vanilla", parallel_scope: ParallelScope = None) -> nn.Module:
    """The convolution ``conv_mode`` asks for, without bias, padding ``kernel_size // 2``.

    vanilla mode, or alpha_in = alpha_out = 0: ``nn.Conv2d`` (:class:`PooledConv2d` at stride 2
    in the octave modes); octave: ``octconv.OctConv2d``;
    multi-octave: :class:`FusedOctConv2d`, or ``octconv.OctConv2d`` when a ``parallel_scope``
    will group its branches (the caller enters the scope, see :class:`ConvBN`).
    """
    check_conv_mode(conv_mode)
    padding = kernel_size // 2
    if conv_mode == "vanilla" or not is_octave(alpha_in, alpha_out):
        cls = PooledConv2d if conv_mode != "vanilla" and stride == 2 else nn.Conv2d
        return cls(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                   bias=False)
    check_octave_split(in_channels, out_channels, alpha_in, alpha_out)
    cls = FusedOctConv2d if conv_mode == "multi-octave" and parallel_scope is None \
        else octconv.OctConv2d
    return cls(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
               alpha=(float(alpha_in), float(alpha_out)), bias=False)


class OctBatchNorm2d(nn.Module):
    """BatchNorm per frequency: ``high`` and ``low`` normalise the two parts of a (high, low)
    tuple separately (octconv's split of ``channels`` by ``alpha``).

    ``narrow=True`` (multi-octave on CPU/GPU) runs each through
    :func:`octconv_exp.models.batchnorm.batch_norm`: the same BatchNorm, faster for channels-last CPU
    tensors with few channels (not a multiple of 16). Same modules and state dict either way."""

    def __init__(self, high_channels, low_channels, narrow=False):
        super().__init__()
        self.high = nn.BatchNorm2d(high_channels)
        self.low = nn.BatchNorm2d(low_channels)
        self.narrow = narrow

    def forward(self, x):
        x_h, x_l = x
        if self.narrow:
            return batchnorm.batch_norm(self.high, x_h), batchnorm.batch_norm(self.low, x_l)
        return self.high(x_h), self.low(x_l)


def make_norm(conv: nn.Module, channels: int) -> nn.Module:
    """The BatchNorm for the output of ``conv``: per frequency when it has a low part (with
    the narrow-channel kernel after a :class:`FusedOctConv2d`)."""
    if isinstance(conv, octconv.OctConv2d) and conv.out_channels["low"] > 0:
        return OctBatchNorm2d(conv.out_channels["high"], conv.out_channels["low"],
                              narrow=isinstance(conv, FusedOctConv2d))
    return nn.BatchNorm2d(channels)


def freq_map(fn: Callable[[torch.Tensor], torch.Tensor], x: Freq) -> Freq:
    """``fn`` applied to a tensor, or to each part of a (high, low) tuple."""
    return tuple(fn(t) for t in x) if isinstance(x, tuple) else fn(x)


def freq_add(a: Freq, b: Freq, inplace: bool = False) -> Freq:
    """The residual add, per frequency (``inplace``: into ``a``'s tensors)."""
    if isinstance(a, tuple) != isinstance(b, tuple):
        raise ValueError("cannot add a (high, low) octave pair and a single tensor: the "
                         "shortcut must produce the frequencies the residual branch does")
    add = torch.Tensor.add_ if inplace else torch.add
    if isinstance(a, tuple):
        return add(a[0], b[0]), add(a[1], b[1])
    return add(a, b)


class FreqApply(nn.Module):
    """A parameter-free module (pooling, activation) applied to each frequency."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return freq_map(self.module, x)


class FreqReLU(nn.ReLU):
    """ReLU per frequency."""

    def forward(self, x):
        return freq_map(super().forward, x)


class FreqGlobalAvgPool(nn.Module):
    """Global average pooling to a N x C matrix; a (high, low) pair is pooled per frequency and
    concatenated, high channels first (the models here merge the frequencies before it)."""

    def forward(self, x):
        return torch.cat([torch.flatten(F.adaptive_avg_pool2d(t, 1), 1)
                          for t in (x if isinstance(x, tuple) else (x,))], dim=1)


class ConvBN(nn.Module):
    """Convolution -> per-frequency BatchNorm -> optional per-frequency ReLU.

    ``parallel_scope(conv)`` is entered around the convolution when the convolution is an octave
    one and ``conv_mode`` is multi-octave (ignored otherwise), as in ``OctaveBlock``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, alpha_in=0.0,
                 alpha_out=0.0, conv_mode="vanilla", parallel_scope: ParallelScope = None,
                 relu=True):
        super().__init__()
        self.conv = make_conv(in_channels, out_channels, kernel_size, stride, alpha_in,
                              alpha_out, conv_mode, parallel_scope)
        self.bn = make_norm(self.conv, out_channels)
        self.relu = FreqReLU(inplace=True) if relu else None
        self.parallel_scope = (parallel_scope if conv_mode == "multi-octave"
                               and isinstance(self.conv, octconv.OctConv2d) else None)
        # (in, out, kernel, stride, alpha_in, alpha_out) as the caller asked, for conv_specs
        self.spec = (in_channels, out_channels, kernel_size, stride,
                     float(alpha_in) if conv_mode != "vanilla" else 0.0,
                     float(alpha_out) if conv_mode != "vanilla" else 0.0)

    def forward(self, x):
        scope = (self.parallel_scope(self.conv) if self.parallel_scope is not None
                 else contextlib.nullcontext())
        with scope:
            out = self.conv(x)
        out = self.bn(out)
        return self.relu(out) if self.relu is not None else out


def projection_shortcut(in_channels, out_channels, stride, alpha_in, alpha_out, **kw):
    """A residual block's shortcut: None (identity) when shape and channel split stay, else a
    1x1 ConvBN projection with the block's stride and alphas."""
    if stride == 1 and in_channels == out_channels and alpha_in == alpha_out:
        return None
    return ConvBN(in_channels, out_channels, 1, stride, alpha_in, alpha_out, relu=False, **kw)


def residual(block, out, x):
    """ReLU(out + shortcut(x)), per frequency: the end of every residual block. ``out`` is a
    BatchNorm's output, which its backward does not read: the add and the ReLU run in place."""
    identity = x if block.shortcut is None else block.shortcut(x)
    return block.relu(freq_add(out, identity, inplace=True))


class BasicBlock(nn.Module):
    """Two 3x3 ConvBNs and a shortcut (a 1x1 ConvBN projection whenever the block changes the
    channels, the resolution or the frequency split, else the identity)."""

    def __init__(self, in_channels, out_channels, stride=1, alpha_in=0.0, alpha_out=0.0,
                 conv_mode="vanilla", parallel_scope: ParallelScope = None, inner_alpha=None):
        super().__init__()
        mid = alpha_out if inner_alpha is None else inner_alpha
        kw = dict(conv_mode=conv_mode, parallel_scope=parallel_scope)
        self.conv1 = ConvBN(in_channels, out_channels, 3, stride, alpha_in, mid, **kw)
        self.conv2 = ConvBN(out_channels, out_channels, 3, 1, mid, alpha_out, relu=False, **kw)
        self.shortcut = projection_shortcut(in_channels, out_channels, stride, alpha_in,
                                            alpha_out, **kw)
        self.relu = FreqReLU(inplace=True)

    def forward(self, x):
        return residual(self, self.conv2(self.conv1(x)), x)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (with the stride) -> 1x1 expand, and a shortcut; torchvision v1.5.

    Alphas as d-li14's octave Bottleneck: the 1x1 reduction converts (alpha_in, alpha_out), the
    3x3 and the expansion run at (alpha_out, alpha_out), the projection shortcut (a 1x1 ConvBN
    with the stride, whenever shape or split change) is (alpha_in, alpha_out)."""

    expansion = 4

    def __init__(self, in_channels, planes, stride=1, alpha_in=0.0, alpha_out=0.0,
                 conv_mode="vanilla", parallel_scope: ParallelScope = None):
        super().__init__()
        out_channels = planes * self.expansion
        kw = dict(conv_mode=conv_mode, parallel_scope=parallel_scope)
        self.conv1 = ConvBN(in_channels, planes, 1, 1, alpha_in, alpha_out, **kw)
        self.conv2 = ConvBN(planes, planes, 3, stride, alpha_out, alpha_out, **kw)
        self.conv3 = ConvBN(planes, out_channels, 1, 1, alpha_out, alpha_out, relu=False, **kw)
        self.shortcut = projection_shortcut(in_channels, out_channels, stride, alpha_in,
                                            alpha_out, **kw)
        self.relu = FreqReLU(inplace=True)

    def forward(self, x):
        return residual(self, self.conv3(self.conv2(self.conv1(x))), x)


def init_weights(model: nn.Module):
    """torchvision's ResNet initialisation: Kaiming-normal (fan out) convolutions, BatchNorm
    weight 1 and bias 0, PyTorch's default Linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- FLOPs

class ConvSpec(NamedTuple):
    """One convolution (or the classifier: kernel 1, one pixel, alphas 0) as a vanilla network
    would run it: out_pixels is the vanilla output's height x width. ``stride`` comes last so
    that the first six fields read as (in_ch, out_ch, kernel, out_pixels, alpha_in, alpha_out)."""
    in_ch: int
    out_ch: int
    kernel: int
    out_pixels: int
    alpha_in: float
    alpha_out: float
    stride: int = 1


def spec_flops(spec: ConvSpec) -> int:
    """Vanilla FLOPs of one convolution (2 per multiply-add)."""
    return 2 * spec.in_ch * spec.out_ch * spec.kernel * spec.kernel * spec.out_pixels


def octave_cost_strided(alpha_in, alpha_out, stride=1):
    """:func:`octave_cost` for a convolution of this stride, as octconv computes it.

    At stride 1 the low-to-high branch runs at the low resolution, a quarter of the output
    pixels. At stride 2 octconv pools the high input and convolves the low input directly: the
    low input already has the output's high resolution, so low-to-high runs at all the output
    pixels (the other three branches as at stride 1)."""
    cost = octave_cost(alpha_in, alpha_out)
    if stride == 2:
        cost += alpha_in * (1 - alpha_out) * 3 / 4
    return cost


def theoretical_flops_ratio(specs: Sequence[ConvSpec], strided: bool = True) -> float:
    """FLOPs relative to vanilla if every split were exact:
    (sum of vanilla FLOPs x octave cost) / (sum of vanilla FLOPs), the classifier's spec with
    cost 1. ``strided=False`` uses the plain :func:`octave_cost` for stride-2 layers too (the
    textbook figure, which under-counts octconv's stride-2 low-to-high branch)."""
    total = octave = 0.0
    for spec in specs:
        spec = ConvSpec(*spec)
        f = spec_flops(spec)
        total += f
        octave += f * (octave_cost_strided(spec.alpha_in, spec.alpha_out, spec.stride) if strided
                       else octave_cost(spec.alpha_in, spec.alpha_out))
    return octave / total


def _out_size(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


def _size2(image_size) -> Tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size[-2:]
    return int(h), int(w)


def _block_specs(blocks, hw) -> Tuple[List[ConvSpec], Tuple[int, int]]:
    """Specs of the ConvBNs of a sequence of residual blocks, following the vanilla sizes:
    the main branch in order, then the shortcut (at the block's output size)."""
    specs = []
    for block in blocks:
        main = [getattr(block, n) for n in ("conv1", "conv2", "conv3") if hasattr(block, n)]
        for unit in main:
            cin, cout, k, s, a_in, a_out = unit.spec
            hw = tuple(_out_size(d, k, s, k // 2) for d in hw)
            specs.append(ConvSpec(cin, cout, k, hw[0] * hw[1], a_in, a_out, s))
        if block.shortcut is not None:
            cin, cout, k, s, a_in, a_out = block.shortcut.spec
            specs.append(ConvSpec(cin, cout, k, hw[0] * hw[1], a_in, a_out, s))
    return specs, hw


# --------------------------------------------------------------------------- networks

def _check_input_size(model, x):
    if x.dim() != 4 or min(x.shape[-2:]) < model.min_input_size:
        raise ValueError(f"{type(model).__name__} ({model.conv_mode}) needs N x C x H x W input "
                         f"with H, W >= {model.min_input_size}, got {tuple(x.shape)}")


def _check_common(conv_mode, alpha, width, num_classes, in_channels):
    check_conv_mode(conv_mode)
    if conv_mode != "vanilla":
        check_alpha(alpha)
    _check_positive_int("width", width)
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("in_channels", in_channels)


class ResNetCifar(nn.Module):
    """He et al. 2016's CIFAR ResNet: 3x3 stem (16 x width) + BN + ReLU, three stages of
    (depth - 2) / 6 basic blocks with 16, 32, 64 x width channels (stride 2 at the start of
    stages 2 and 3, projection shortcuts), global average pooling, Linear. Returns logits."""

    def __init__(self, depth=20, width=1, conv_mode="vanilla", alpha=0.5, num_classes=10,
                 in_channels=3, parallel_scope: ParallelScope = None):
        super().__init__()
        _check_common(conv_mode, alpha, width, num_classes, in_channels)
        if (not isinstance(depth, int) or isinstance(depth, bool) or depth < 8
                or (depth - 2) % 6 != 0):
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, "
                             f"{', '.join(map(str, CIFAR_EXAMPLE_DEPTHS))}, ...), got {depth!r}")
        if conv_mode == "octave":
            parallel_scope = None
        a = float(alpha) if conv_mode != "vanilla" else 0.0
        self.depth, self.width, self.conv_mode, self.alpha = depth, width, conv_mode, a
        n = (depth - 2) // 6
        kw = dict(conv_mode=conv_mode, parallel_scope=parallel_scope)
        c = 16 * width
        self.stem = ConvBN(in_channels, c, 3, 1, 0.0, a, **kw)
        stages = []
        in_c = c
        for i, out_c in enumerate((c, 2 * c, 4 * c)):
            blocks = []
            for j in range(n):
                last = i == 2 and j == n - 1
                blocks.append(BasicBlock(in_c, out_c, 2 if (i > 0 and j == 0) else 1,
                                         alpha_in=a, alpha_out=0.0 if last else a,
                                         inner_alpha=a, **kw))
                in_c = out_c
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = FreqGlobalAvgPool()
        self.fc = nn.Linear(in_c, num_classes)
        init_weights(self)
        # octave: two halvings of the high part and the low part one octave below it
        self.min_input_size = 1 if conv_mode == "vanilla" else 8

    def forward(self, x):
        _check_input_size(self, x)
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x))

    def conv_specs(self, image_size=32) -> List[ConvSpec]:
        hw = _size2(image_size)
        cin, cout, k, s, a_in, a_out = self.stem.spec
        specs = [ConvSpec(cin, cout, k, hw[0] * hw[1], a_in, a_out, s)]
        block_specs, hw = _block_specs(list(self.layer1) + list(self.layer2) + list(self.layer3),
                                       hw)
        specs += block_specs
        specs.append(ConvSpec(self.fc.in_features, self.fc.out_features, 1, 1, 0.0, 0.0, 1))
        return specs


class ResNetImageNet(nn.Module):
    """Bottleneck ResNet (depth 26, 50, 101, 152), torchvision v1.5 layout: 7x7 stride-2 stem +
    BN + ReLU + 3x3 stride-2 max-pool (always vanilla), four stages of 64, 128, 256, 512 x width
    planes (x4 out), global average pooling, Linear. Returns logits."""

    def __init__(self, depth=50, width=1, conv_mode="vanilla", alpha=0.5, num_classes=1000,
                 in_channels=3, parallel_scope: ParallelScope = None):
        super().__init__()
        _check_common(conv_mode, alpha, width, num_classes, in_channels)
        if depth not in IMAGENET_LAYERS or isinstance(depth, bool):
            raise ValueError(f"ImageNet ResNet depth must be one of "
                             f"{', '.join(map(str, IMAGENET_LAYERS))}, got {depth!r}")
        if conv_mode == "octave":
            parallel_scope = None
        a = float(alpha) if conv_mode != "vanilla" else 0.0
        self.depth, self.width, self.conv_mode, self.alpha = depth, width, conv_mode, a
        kw = dict(conv_mode=conv_mode, parallel_scope=parallel_scope)
        stem_c = 64 * width
        self.stem = ConvBN(in_channels, stem_c, 7, 2, conv_mode="vanilla")  # always vanilla
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_c = stem_c
        stages = []
        for i, n in enumerate(IMAGENET_LAYERS[depth]):
            planes = 64 * width * 2 ** i
            blocks = []
            for j in range(n):
                if i == 0 and j == 0:
                    alphas = (0.0, a)
                elif i == 3:
                    alphas = (a, 0.0) if j == 0 else (0.0, 0.0)
                else:
                    alphas = (a, a)
                blocks.append(Bottleneck(in_c, planes, 2 if (i > 0 and j == 0) else 1,
                                         *alphas, **kw))
                in_c = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = FreqGlobalAvgPool()
        self.fc = nn.Linear(in_c, num_classes)
        init_weights(self)
        # octave: layer3's low part (input / 64, rounded down along the way) must keep a pixel
        self.min_input_size = 1 if conv_mode == "vanilla" else 30

    def forward(self, x):
        _check_input_size(self, x)
        x = self.maxpool(self.stem(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x))

    def conv_specs(self, image_size=224) -> List[ConvSpec]:
        hw = _size2(image_size)
        cin, cout, k, s, a_in, a_out = self.stem.spec
        hw = tuple(_out_size(d, k, s, k // 2) for d in hw)
        specs = [ConvSpec(cin, cout, k, hw[0] * hw[1], a_in, a_out, s)]
        hw = tuple(_out_size(d, 3, 2, 1) for d in hw)  # max-pool
        block_specs, hw = _block_specs([b for layer in (self.layer1, self.layer2, self.layer3,
                                                        self.layer4) for b in layer], hw)
        specs += block_specs
        specs.append(ConvSpec(self.fc.in_features, self.fc.out_features, 1, 1, 0.0, 0.0, 1))
        return specs
