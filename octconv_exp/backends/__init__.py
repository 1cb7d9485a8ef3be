"""Backends: thin adapters that run the one training loop on a kind of hardware.

A backend builds the model for its hardware, wraps model + optimizer into a training step
``(images, labels) -> (log_probs, loss)`` and the model into an inference step
``images -> log_probs``, and builds loaders with its batching semantics. The loop
(``octconv_exp.training.loop``) is the same for all of them. The subpackage also holds the
process group and ranks (``distributed``), the allocator setting and what a backend refuses in
a config (``checks``). It may import records, models, data and errors.
"""
import logging

from ..errors import UserError

log = logging.getLogger("octconv_exp")


def poptorch_available():
    """Whether PopTorch imports. One built for another torch asserts at import (poptorch 3.4
    python/__init__.py): device=auto then warns and carries on without IPUs."""
    try:
        import poptorch  # noqa: F401
    except ImportError:
        return False
    except AssertionError as exc:
        from .ipu import poptorch_torch_mismatch

        log.warning("device=auto: PopTorch is installed but unusable, using CPU/GPU: %s",
                    poptorch_torch_mismatch(exc))
        return False
    return True


def resolve_device(requested, ipus_needed=1):
    """auto -> ipu (PopTorch and the IPUs the run needs present) | cuda | cpu; explicit
    choices are checked."""
    import torch

    if requested == "auto":
        if poptorch_available():
            import poptorch

            if poptorch.ipuHardwareIsAvailable(ipus_needed):
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
