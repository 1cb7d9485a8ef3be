"""poptorch.optim: torch optimizers with PopTorch's extra keyword arguments (loss_scaling, ...).

As in PopTorch, each class is the torch optimizer with extra keyword-only-in-practice
arguments; unknown keyword arguments raise TypeError like the real constructors do.
"""
import torch


class Optimizer:
    """Marker base, as poptorch.optim.Optimizer."""


def _extra(optimizer, **extra):
    for key, value in extra.items():
        optimizer.defaults[key] = value
        for group in optimizer.param_groups:
            group.setdefault(key, value)


class SGD(torch.optim.SGD, Optimizer):
    def __init__(self, params, lr=0.01, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, loss_scaling=None, velocity_scaling=None,
                 use_combined_accum=None, max_grad_norm=None):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov)
        _extra(self, loss_scaling=1.0 if loss_scaling is None else loss_scaling,
               velocity_scaling=velocity_scaling)


class Adam(torch.optim.Adam, Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, loss_scaling=None, accum_type=None,
                 first_order_momentum_accum_type=None, second_order_momentum_accum_type=None,
                 max_grad_norm=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad)
        _extra(self, loss_scaling=1.0 if loss_scaling is None else loss_scaling)


class AdamW(torch.optim.AdamW, Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 amsgrad=False, *, loss_scaling=None, bias_correction=True, accum_type=None,
                 first_order_momentum_accum_type=None, second_order_momentum_accum_type=None,
                 max_grad_norm=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad)
        _extra(self, loss_scaling=1.0 if loss_scaling is None else loss_scaling)


class RMSprop(torch.optim.RMSprop, Optimizer):
    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, *, loss_scaling=None, use_tf_variant=None):
        super().__init__(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                         momentum=momentum, centered=centered)
        _extra(self, loss_scaling=1.0 if loss_scaling is None else loss_scaling)


class LAMB(torch.optim.AdamW, Optimizer):
    """Stands in for PopTorch's LAMB (numerically AdamW here: the double checks plumbing)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 bias_correction=True, *, loss_scaling=None, max_weight_norm=None,
                 accum_type=None, first_order_momentum_accum_type=None,
                 second_order_momentum_accum_type=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        _extra(self, loss_scaling=1.0 if loss_scaling is None else loss_scaling,
               bias_correction=bias_correction)
