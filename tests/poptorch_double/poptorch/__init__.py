"""A test double of Graphcore's ``poptorch`` 3.4 for machines without IPUs (put on sys.path by
the tests only). It models the behaviour of the real library - not just its signatures - from
its source (graphcore/poptorch, tag sdk/poptorch/3.4.0, python/*; C++ where the behaviour lives
there), and computes on the CPU. Every modelled behaviour cites the file and line it follows
(python/ files are cited by name, e.g. "__init__.py:20").

Modules: options.py (Options), _dataloader.py (DataLoader, AsynchronousDataAccessor: a ring
buffer whose slots are overwritten in place, a worker with its own copies and RNG),
_poplar_executor.py (trainingModel, inferenceModel, PoplarExecutor, device accounting, output
modes, optimizer state on the "device"), optim.py, ops.py (MultiConv), enums.py, _errors.py.

Beside it (tests/poptorch_double): ``popdist`` (popdist/: the PopRun instance API and
``popdist.poptorch.Options``) and ``horovod.torch`` (horovod/: its collectives over gloo), for
PopRun runs; the training executable reduces gradients across processes when
``Options.Distributed.numProcesses > 1`` (_poplar_executor.py, _reduce_across_processes).

Double-only (not PopTorch):
- ``LOG`` records what reached the double ("options", "dataloaders", "executors",
  "multiconv", "events"); written as JSON at exit to the file named by POPTORCH_DOUBLE_LOG.
- ``POPTORCH_DOUBLE_IPUS``: the physical IPUs the machine pretends to have (default 0).
- ``POPTORCH_DOUBLE_TORCH_VERSION``: the torch version this "build" of PopTorch was built for;
  when set, importing fails as the real one does with another torch (__init__.py:20-23).
- ``POPTORCH_DOUBLE_WORKER_SEED``: fixes the (otherwise non-deterministic) torch seed of the
  Async loaders' worker "processes".
- ``PoptorchError``: a base class of every error the double raises on PopTorch's behalf (the
  real types are there too: ``poptorch.Error``, RuntimeError, AttributeError, ...).
"""
import os

import torch

# __init__.py:20-23: PopTorch is built for one torch version and refuses any other at import
# ("@TORCH_VERSION@" is substituted at build time).
_TORCH_VERSION = os.environ.get("POPTORCH_DOUBLE_TORCH_VERSION")
if _TORCH_VERSION:
    assert torch.__version__.startswith(_TORCH_VERSION), (
        "This version"
        f" of PopTorch only works with torch=={_TORCH_VERSION} but the version "
        f"installed is {torch.__version__}")

# __init__.py:25-30: fork safety of the RDMA driver on PODs.
if "RDMAV_FORK_SAFE" not in os.environ:
    os.environ["RDMAV_FORK_SAFE"] = "1"

# pylint: disable=wrong-import-position
from . import enums, optim
from ._errors import (Error, PoptorchError, RecoverableError, UnrecoverableError,
                      createPoptorchError)
from ._log import IPUS_IN_USE as _IPUS_IN_USE
from ._log import LOG
from ._dataloader import AsynchronousDataAccessor, DataLoader
from ._poplar_executor import (PoplarExecutor, __version__, inferenceModel, isRunningOnIpu,
                               trainingModel)
from .enums import *  # noqa: F401,F403  (__init__.py:46)
from .ops import MultiConv, identity_loss  # __init__.py:47 (from .ops import *)
from .options import Options


def ipuHardwareIsAvailable(num_ipus: int = 1) -> bool:
    """__init__.py:749-757 -> ipuHardwareVersion(num_ipus) != 0, which is 0 when
    POPTORCH_IPU_MODEL or POPTORCH_SMALL_IPU_MODEL is set (popart_compiler/source/Utils.cpp
    :117-121) or when no device of ``num_ipus`` IPUs exists (enumerateDevices, :122-126).
    Devices come in powers of 2 (PopTorch reserves a power of 2, CompilerImpl.cpp:693-714), so
    the double has a device of n IPUs when n <= POPTORCH_DOUBLE_IPUS and n is a power of 2.
    It does not check whether the IPUs are free (docstring, 752)."""
    LOG["events"].append(f"ipuHardwareIsAvailable({num_ipus})")
    from ._poplar_executor import _ipu_model_env, _physical_ipus
    if _ipu_model_env():
        return False
    power_of_two = num_ipus >= 1 and (num_ipus & (num_ipus - 1)) == 0
    return power_of_two and num_ipus <= _physical_ipus()


def ipuHardwareVersion() -> int:
    """__init__.py:760-769 (Mk2 = 2)."""
    version = 2 if ipuHardwareIsAvailable(1) else 0
    assert version != 0, "No IPU hardware available on this system"
    return version


def setLogLevel(level):
    """__init__.py:772-783 (the double only sets the Python logger)."""
    import logging
    levels = {"TRACE": logging.DEBUG, "DEBUG": logging.DEBUG, "INFO": logging.INFO,
              "WARN": logging.WARN, "ERR": logging.ERROR, "OFF": logging.CRITICAL}
    if level not in levels:
        raise ValueError("Unknown log level: " + str(level))
    logging.getLogger("poptorch::python").setLevel(levels[level])
