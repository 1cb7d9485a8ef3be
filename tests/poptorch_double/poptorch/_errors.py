"""PopTorch's exception types (python/poptorch.cpp:624-677, 747-751) and how errors are built.

- ``poptorch.Error`` is created with ``PyErr_NewException(..., base=PyExc_Exception)``
  (poptorch.cpp:627-630): it derives from ``Exception``, *not* ``RuntimeError``.
  ``RecoverableError`` and ``UnrecoverableError`` derive from ``Error`` (poptorch.cpp:747-751).
- Python-side errors go through ``_impl.createPoptorchError(msg)`` (_impl.py:67-73): an
  ``Error("'poptorch_py_error': <msg>")`` with ``.type``, ``.message`` and ``.location``.
- C++ errors (``ERROR(...)``) reach Python as ``Error`` whose text is
  ``"In <file>:<line>: '<type>': <message>"`` (poptorch_err/source/ExceptionHandling.cpp:76-78),
  type ``poptorch_cpp_error`` (ExceptionHandling.cpp:50-55).

``PoptorchError`` is NOT part of PopTorch: it is a marker base class of the double only, so that
tests can catch "anything the double raised on PopTorch's behalf". Every error the double raises
for PopTorch is *also* an instance of the real type (``Error``, ``RuntimeError``,
``AttributeError``, ...): catch those in code meant for real PopTorch.
"""

NO_EXECUTABLE_ERR = "Model has not been compiled or has been destroyed."  # _poplar_executor.py:30


class PoptorchError(Exception):
    """Double-only marker base (not in PopTorch)."""


class Error(PoptorchError):
    """``poptorch.Error`` (poptorch.cpp:624-664, 747): an ``Exception`` subclass."""


class RecoverableError(Error):  # poptorch.cpp:666-674, 749
    pass


class UnrecoverableError(Error):  # poptorch.cpp:751
    pass


class _RuntimeError(PoptorchError, RuntimeError):
    """Where PopTorch raises a plain ``RuntimeError``."""


class _AttributeError(PoptorchError, AttributeError):
    """Where PopTorch raises a plain ``AttributeError`` (e.g. frozen options)."""


def createPoptorchError(msg):
    """_impl.py:67-73."""
    error = Error(f"'poptorch_py_error': {msg}")
    error.type = "poptorch_py_error"
    error.message = msg
    error.location = ""
    return error


def _cpp_error(msg, where, kind="poptorch_cpp_error"):
    """An error raised by PopTorch's C++ (or PopART through it): ExceptionHandling.cpp:76-78.
    ``where`` is the "file:line" of the ERROR in the 3.4.0 sources."""
    error = Error(f"In {where}: '{kind}': {msg}")
    error.type = kind
    error.message = msg
    error.location = ""
    return error
