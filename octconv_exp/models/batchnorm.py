"""BatchNorm for channels-last CPU tensors with few channels, as multi-octave runs it.

An octave layer splits its channels by alpha, so at alpha 0.5 a 16-channel layer (ResNet-20's
first stage, the seed CNN at expansion 1) normalises two 8-channel tensors. torch's CPU
BatchNorm kernel for channels-last tensors walks the N*H*W rows of the (N*H*W, C) matrix one
row at a time, and unless C is a multiple of 16 it is slow at it: an 8-channel tensor takes
longer than a 16-channel one with twice the elements (the measurements, per shape of the
models: docs/performance.md, "BatchNorm"; ``bench/bench_batchnorm.py`` repeats them).

:func:`batch_norm` computes the same BatchNorm over a wider view of the same memory
(:func:`wide_batch_norm`): the (N*H*W, C) matrix read as (N*H*W / k, k*C) with k*C up to 64.
The reductions are torch's own BatchNorm kernels run over the wide view, whose k*C "channels"
they handle at full speed; per-column results are then folded into per-channel ones (sums add;
variances combine exactly with the group means). The running statistics,
``num_batches_tracked`` and ``momentum=None`` (cumulative average) follow ``nn.BatchNorm2d``.
Outputs and gradients agree with ``nn.BatchNorm2d`` to float32 rounding
(tests/test_batchnorm.py), not bit for bit.

Every other case goes to the module itself, unchanged: channels-first, 16 channels or a
multiple of 16, 32 or more channels, a small tensor (:data:`MIN_ELEMENTS`), a dtype other than
float32/float64, a device other than the CPU, a subclass of ``nn.BatchNorm2d`` (the
data-parallel ``SyncBatchNorm`` among them), code that ``torch.compile`` is tracing (its
own kernels fuse BatchNorm), and code that ``torch.jit.trace`` or the ONNX exporter is tracing
(the wide view's fold is fixed to the traced shape, and the ONNX exporter wrote the running
statistics the wide path reads under ``no_grad`` as inputs no node produced: ONNX Runtime
refused the file).
"""
import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

#: Channel counts below this that are not a multiple of 16 take the wide-view path ...
NARROW_CHANNELS = 32
#: ... from this many elements: below it the wide view's few extra operations cost more than
#: the wider rows save (where the two sizes come from: docs/performance.md, "BatchNorm").
MIN_ELEMENTS = {"multiple_of_8": 2 ** 18, "other": 2 ** 15}
#: The wide view's row length (channels x rows folded together), at most.
WIDE_COLUMNS = 64


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    dynamo = getattr(torch, "_dynamo", None)  # torch 2.0/2.1
    return bool(dynamo is not None and dynamo.is_compiling())


def uses_wide_path(bn: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`batch_norm` computes ``bn(x)`` itself (else it calls ``bn``)."""
    return (type(bn) is nn.BatchNorm2d and x.dim() == 4 and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and 1 < x.shape[1] < NARROW_CHANNELS and x.shape[1] % 16 != 0
            and x.numel() >= MIN_ELEMENTS["multiple_of_8" if x.shape[1] % 8 == 0 else "other"]
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            and not _compiling() and not torch.jit.is_tracing())


def _fold(c: int, m: int) -> int:
    """How many rows of the (m, c) matrix one wide row holds: a power of two dividing m."""
    k = 1
    while 2 * k * c <= WIDE_COLUMNS and m % (2 * k) == 0:
        k *= 2
    return k


def _wide(t: torch.Tensor, k: int) -> torch.Tensor:
    """The channels-last N x C x H x W tensor ``t`` as its (N*H*W / k, k*C) matrix (a view)."""
    c = t.shape[1]
    return t.permute(0, 2, 3, 1).view(t.numel() // (k * c), k * c)


def _fold_sum(per_column: torch.Tensor, k: int, c: int) -> torch.Tensor:
    """Per-channel sums from the wide view's per-column sums."""
    return per_column.view(k, c).sum(0)


def _stats(x_wide: torch.Tensor, k: int, c: int):
    """The per-channel mean and biased variance of the wide view, from torch's own kernel over
    its k*C columns (``batch_norm_update_stats``: two passes, no temporaries), combined over
    the k column groups exactly: var = mean of (group var + (group mean - mean)^2)."""
    mean_w, var_w = torch.batch_norm_update_stats(x_wide, None, None, 0.0)
    mean_w, var_w = mean_w.view(k, c), var_w.view(k, c)
    mean = mean_w.mean(0)
    return mean, (var_w + (mean_w - mean).square()).mean(0)


def _affine(x: torch.Tensor, k: int, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x * scale + shift per channel, in x's (channels-last) layout."""
    out = torch.empty_like(x, memory_format=torch.channels_last)
    torch.addcmul(shift.repeat(k), _wide(x, k), scale.repeat(k), out=_wide(out, k))
    return out


class _BatchStatsNorm(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias with the batch's own mean and invstd; the
    backward is BatchNorm's (the statistics depend on x)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, k):
        scale = invstd * weight
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.k = k
        return _affine(x, k, scale, bias - mean * scale)

    @staticmethod
    @once_differentiable  # a second derivative raises instead of coming out wrong
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        k, c = ctx.k, x.shape[1]
        m = x.numel() // c
        g = _wide(grad.contiguous(memory_format=torch.channels_last), k)
        # per column: sum(g * (x - mean) * invstd) and sum(g), with the channel's mean and
        # invstd (torch's BatchNorm backward reduction over the wide view, one pass)
        _, sum_g_xhat, sum_g = torch.ops.aten.native_batch_norm_backward(
            g, _wide(x, k), None, None, None, mean.repeat(k), invstd.repeat(k), True, 0.0,
            [False, True, True])
        sum_g_xhat, sum_g = _fold_sum(sum_g_xhat, k, c), _fold_sum(sum_g, k, c)
        # grad_x = weight * invstd * (g - sum_g / m - x_hat * sum_g_xhat / m) = a g + b x + shift
        a = weight * invstd
        b = -a * invstd * sum_g_xhat / m
        shift = -a * sum_g / m - b * mean
        grad_x = _affine(x, k, b, shift)
        _wide(grad_x, k).addcmul_(g, a.repeat(k))
        return grad_x, sum_g_xhat, sum_g, None, None, None


def batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)``: the same values, gradients and running-statistics updates; computed by
    :func:`wide_batch_norm` where :func:`uses_wide_path` says it is the faster."""
    return wide_batch_norm(bn, x) if uses_wide_path(bn, x) else bn(x)


def wide_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)`` over the wide view, for any channels-last 4-d ``x`` (whether or not it is the
    faster there: bench/bench_batchnorm.py times both)."""
    bn._check_input_dim(x)
    c = x.shape[1]
    m = x.numel() // c
    k = _fold(c, m)
    weight = bn.weight if bn.weight is not None else x.new_ones(c)
    bias = bn.bias if bn.bias is not None else x.new_zeros(c)
    # nn.BatchNorm2d.forward's bookkeeping (torch/nn/modules/batchnorm.py, _BatchNorm.forward)
    tracking = bn.training and bn.track_running_stats
    factor = 0.0 if bn.momentum is None else bn.momentum
    if tracking and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    with torch.no_grad():
        if batch_stats:
            mean, var = _stats(_wide(x.detach(), k), k, c)
            if tracking and bn.running_mean is not None:
                bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                bn.running_var.mul_(1 - factor).add_(var * (m / (m - 1)), alpha=factor)
        else:
            mean, var = bn.running_mean, bn.running_var
        invstd = torch.rsqrt(var + bn.eps)
    if batch_stats:
        return _BatchStatsNorm.apply(x, weight, bias, mean, invstd, k)
    scale = invstd * weight
    return _affine(x, k, scale, bias - mean * scale) if not torch.is_grad_enabled() \
        else x * scale.view(1, c, 1, 1) + (bias - mean * scale).view(1, c, 1, 1)
