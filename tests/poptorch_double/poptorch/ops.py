"""poptorch.MultiConv as in PopTorch 3.4 (ops.py:1138-1303) and where its checks really happen.

- The setters validate eagerly in Python (ops.py:1168-1288).
- ``__enter__``/``__exit__`` call ``torch.ops.poptorch.begin_multi_conv()`` /
  ``end_multi_conv(...)`` (ops.py:1290-1303); ``__enter__`` returns None. These ops take no
  tensor and have no CPU kernel (poptorch/source/dispatch_tracer/RegisterAtenOverloads.cpp:897,
  958-977), so outside an IPU model (plain CPU execution) torch's dispatcher raises
  NotImplementedError ("There were no tensor arguments to this function ...") - reproduced.
- Inside an IPU model the checks run when the graph is compiled, i.e. on the first call of
  the PoplarExecutor, and raise ``poptorch.Error``: nesting
  (poptorch/source/PopartLateCanonicalization.cpp:36), an empty scope (:44-45), and per-conv
  option lists whose length is neither 1 (broadcast, :21-27) nor the number of convolutions
  (PopART willow/src/builder.cpp:288-307).
"""
import torch

from . import enums
from ._errors import _cpp_error
from ._log import LOG

# The executor sets this while it runs the model (tracing/compiling, then the double's
# execution): [executor, compiling?]
_RUNNING = [None, False]
_ACTIVE_MULTICONV = [None]
# The losses of the training graph being run: a list while a training executor runs its model
# (_poplar_executor._LossTracer), else None.
_IDENTITY_LOSSES = [None]


def identity_loss(x: "torch.Tensor", reduction: "str") -> "torch.Tensor":
    """ops.py:1014-1048: reduction "sum" / "mean" / "none" -> 0 / 1 / 2 (anything else:
    AssertionError "Unsupported reduction type!"), computed as the op's CPU kernel does
    (poptorch/source/dispatch_tracer/RegisterAtenOverloads.cpp:863-877: at::sum, at::mean,
    t.clone()). Inside a training model the result is marked as a loss, as the traced
    ``poptorch::identity_loss`` node is (PoptorchHandlers.gen.cpp:173 -> popart::identityloss,
    the only op PopART is told is a loss: popart_compiler/source/Compiler.cpp:157-161)."""
    if reduction == "sum":
        out = torch.sum(x)
    elif reduction == "mean":
        out = torch.mean(x)
    else:
        assert reduction == "none", "Unsupported reduction type!"
        out = x.clone()
    if _IDENTITY_LOSSES[0] is not None:
        _IDENTITY_LOSSES[0].append(out)
    return out


def _no_fallback_error(op):
    # torch's dispatcher for an op without tensor arguments and no kernel for the (empty)
    # dispatch key set: c10 Dispatcher, NotImplementedError (verified on torch 2.0.1 / 2.14).
    return NotImplementedError(
        "There were no tensor arguments to this function (e.g., you passed an empty list of "
        f"Tensors), but no fallback function is registered for schema poptorch::{op}.  This "
        "usually means that this function requires a non-empty list of Tensors, or that you "
        "(the operator writer) forgot to register a fallback function.")


class MultiConv():
    def __init__(self):
        self._available_memory_proportions = None
        self._partials_types = None
        self._plan_type = None
        self._per_conv_reserved_tiles = None
        self._cycle_back_off = None
        self._enable_conv_ditherings = None
        self._convs = 0
        self._hook = None
        self._outer = None

    @staticmethod
    def _validatePerConvProperty(name, value, expected_scalar_type):
        # ops.py:1168-1181
        if value is None:
            return value
        if isinstance(value, expected_scalar_type):
            return (value, )
        if isinstance(value, (list, tuple)) and len(value) > 0 and all(
                isinstance(x, expected_scalar_type) for x in value):
            return value
        raise AssertionError(f"Invalid {name}!")

    def availableMemoryProportions(self, value):
        # ops.py:1183-1200 (floats only: 0 or 1 as ints are refused)
        self._available_memory_proportions = self._validatePerConvProperty(
            "available memory proportion", value, float)
        return self

    def partialsTypes(self, value):
        # ops.py:1202-1227
        def encode_dtype(dtype):
            if dtype in [torch.float, torch.float32]:
                return 0
            if dtype in [torch.half, torch.float16]:
                return 1
            raise ValueError('Invalid partials types. Expecting torch.float or torch.half')

        if isinstance(value, (list, tuple)):
            value = [encode_dtype(v) for v in value]
        else:
            value = (encode_dtype(value), )
        self._partials_types = value
        return self

    def enableConvDithering(self, value):
        # ops.py:1229-1251
        if value is None:
            self._enable_conv_ditherings = value
        elif isinstance(value, (list, tuple)):
            for x in value:
                if not isinstance(x, bool):
                    raise ValueError("value must be bool or list of bools")
            self._enable_conv_ditherings = value
        elif isinstance(value, bool):
            self._enable_conv_ditherings = (value, )
        else:
            raise ValueError("value must be bool or list of bools")
        return self

    def planType(self, value):
        # ops.py:1253-1268
        if value is None:
            self._plan_type = value
        elif isinstance(value, enums.MultiConvPlanType):
            self._plan_type = value
        else:
            raise AssertionError("Invalid plan type!")
        return self

    def perConvReservedTiles(self, value: int):
        assert isinstance(value, int)  # ops.py:1276
        self._per_conv_reserved_tiles = value
        return self

    def cycleBackOff(self, value: float):
        assert isinstance(value, float)  # ops.py:1286
        self._cycle_back_off = value
        return self

    def __enter__(self):
        if _RUNNING[0] is None:
            raise _no_fallback_error("begin_multi_conv")
        if _ACTIVE_MULTICONV[0] is not None:
            # PopartLateCanonicalization.cpp:36
            raise _cpp_error("Nested poptorch.MultiConv is not supported.",
                             "poptorch/source/PopartLateCanonicalization.cpp:36")
        _ACTIVE_MULTICONV[0] = self
        self._convs = 0

        def count(module, inputs, output):
            if isinstance(module, torch.nn.modules.conv._ConvNd):
                self._convs += 1

        self._hook = torch.nn.modules.module.register_module_forward_hook(count)
        # ops.py:1290-1291: no ``return self``

    def __exit__(self, exc_type, exc, tb):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        _ACTIVE_MULTICONV[0] = None
        if exc_type is not None:
            return False
        if self._convs == 0:
            # PopartLateCanonicalization.cpp:44-45
            raise _cpp_error("Unexpected end_multi_conv, is the IR malformed?",
                             "poptorch/source/PopartLateCanonicalization.cpp:44")
        for name, values in (("availableMemoryProportions", self._available_memory_proportions),
                             ("partialsTypes", self._partials_types),
                             ("enableConvDithering", self._enable_conv_ditherings)):
            # broadcast of a single value (PopartLateCanonicalization.cpp:21-27), then PopART's
            # check (willow/src/builder.cpp:288-307)
            if values is not None and len(values) not in (1, self._convs):
                raise _cpp_error(
                    f"For MultiConvOp 'MultiConv', number of {name} parameter sets "
                    f"({len(values)}) does not match the number of input sets ({self._convs})",
                    "willow/src/builder.cpp:290", kind="popart_exception")
        record = {"convs": self._convs,
                  "plan_type": None if self._plan_type is None else self._plan_type.name,
                  "available_memory_proportions": None
                  if self._available_memory_proportions is None
                  else list(self._available_memory_proportions),
                  "partials_types": None if self._partials_types is None
                  else list(self._partials_types),
                  "per_conv_reserved_tiles": self._per_conv_reserved_tiles,
                  "cycle_back_off": self._cycle_back_off}
        if record not in LOG["multiconv"]:
            LOG["multiconv"].append(record)
        return False


__all__ = ["MultiConv", "identity_loss"]
