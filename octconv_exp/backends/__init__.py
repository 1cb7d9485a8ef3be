"""Backends: thin adapters that run the one training loop on a kind of hardware.

A backend builds the model for its hardware, wraps model + optimizer into a training step
``(images, labels) -> (log_probs, loss)`` and the model into an inference step
``images -> log_probs``, and builds loaders with its batching semantics. The loop
(``octconv_exp.loop``) is the same for all of them.
"""
from ..errors import UserError


def poptorch_available():
    try:
        import poptorch  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_device(requested):
    """auto -> ipu (PopTorch and an IPU present) | cuda | cpu; explicit choices are checked."""
    import torch

    if requested == "auto":
        if poptorch_available():
            import poptorch

            if poptorch.ipuHardwareIsAvailable():
                return "ipu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda: no CUDA device is available here; use device=auto or device=cpu")
    return requested


def make_backend(cfg, device):
    if device == "ipu":
        from .ipu import IpuBackend

        return IpuBackend(cfg)
    from .native import NativeBackend

    return NativeBackend(cfg, device)
