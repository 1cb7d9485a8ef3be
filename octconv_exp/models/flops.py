"""FLOPs of a model: counted (:class:`FlopCounter`, on any model) and the theoretical ratio to
vanilla when channels split exactly by alpha (the seed CNN's formula, a ResNet's conv specs)."""
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .octave import ClassificationModel, WithLoss, octave_cost
from .resnet import theoretical_flops_ratio


def theoretical_ratio(model, cfg, image_shape, num_classes):
    """The model's FLOPs relative to vanilla if channels split exactly by alpha: the seed CNN's
    formula, a model's ``conv_specs`` (the ResNets), else None (a model we cannot read)."""
    net = model.net if isinstance(model, WithLoss) else model
    if isinstance(net, ClassificationModel):
        return seed_cnn_flops_ratio(cfg.conv.mode, float(cfg.alpha), int(cfg.expansion),
                                    num_classes)
    if hasattr(net, "conv_specs"):
        return theoretical_flops_ratio(net.conv_specs(tuple(image_shape[-2:])))
    return None


class FlopCounter(TorchFunctionMode):
    """Counts the FLOPs (2 per multiply-add) of the convolutions and matrix products run inside
    it, as ``torch.utils.flop_counter.FlopCounterMode`` does (bias adds, normalisation, pooling
    and activations not counted), but built on ``torch.overrides.TorchFunctionMode`` alone, so
    it gives the same numbers on torch 2.0.1 (which Poplar SDK 3.3/3.4 pin and which has no
    flop_counter) and on the newest torch. A torch function mode sees functional calls too
    (``F.conv2d`` in :class:`FusedOctConv2d`), which module hooks would miss."""

    CONVS = (torch.conv1d, torch.conv2d, torch.conv3d)
    LINEAR = (torch._C._nn.linear, F.linear)
    MATMULS = (torch.mm, torch.bmm, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
               torch.Tensor.mm, torch.Tensor.bmm)
    ADDMMS = (torch.addmm, torch.Tensor.addmm, torch.baddbmm)

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in self.CONVS:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            # out: N x C_out x spatial; weight: C_out x C_in/groups x kernel
            self.total += 2 * out.numel() * weight[0].numel()
        elif func in self.LINEAR:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            self.total += 2 * out.numel() * weight.shape[-1]
        elif func in self.MATMULS:
            self.total += 2 * out.numel() * args[0].shape[-1]
        elif func in self.ADDMMS:
            self.total += 2 * out.numel() * args[1].shape[-1]
        return out


def count_flops_per_image(model, image_shape=(3, 32, 32)):
    """FLOPs of one forward pass of one image (:class:`FlopCounter`: 2 per multiply-add)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with FlopCounter() as counter, torch.no_grad():
            model(torch.zeros(1, *image_shape, device=device))
    finally:
        model.train(was_training)
    return int(counter.total)


def seed_cnn_flops_ratio(conv_mode, alpha, expansion, num_classes=10):
    """The seed CNN's FLOPs relative to vanilla if channels split exactly by alpha."""
    if conv_mode == "vanilla":
        return 1.0
    c = 16 * expansion
    # (in, out, pixels, alpha_in, alpha_out) of the three convolutions, 3x3 kernels.
    layers = [(3, c, 32 * 32, 0.0, alpha), (c, 2 * c, 16 * 16, alpha, alpha),
              (2 * c, c, 8 * 8, alpha, 0.0)]
    conv = [2 * 9 * cin * cout * px for cin, cout, px, _, _ in layers]
    head = 2 * c * 4 * 4 * num_classes
    octave = sum(f * octave_cost(a_in, a_out) for f, (_, _, _, a_in, a_out) in zip(conv, layers))
    return (octave + head) / (sum(conv) + head)
