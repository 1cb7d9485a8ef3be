"""speed.malloc: keep freed memory mapped, so that a CPU training step's tensors do not page-fault.

Every CPU training step allocates and frees the same large tensors (activations, their
gradients), each megabytes. torch's CPU allocator takes them from the C library's malloc. glibc
returns large freed blocks to the kernel: blocks above its mmap threshold are unmapped on free,
and the top of the heap is trimmed once more than the trim threshold of it is free. Both
thresholds move with the history of allocations ("dynamic" thresholds), so whether a step's
tensors land in fresh memory varies from run to run. Fresh memory costs a page fault per 4 KiB
page on first touch, and the kernel zeroes each page: measured on the project machine (2-core
AMD EPYC, torch 2.14.1), 6 000 to 26 000 minor faults (23 to 100 MiB) per training step of
ResNet-20 at batch 128, and 4 000 to 18 000 per step of the seed CNN at expansion 4 batch 64, about
0.2 ms per MiB (docs/performance.md).

:func:`apply` sets glibc's thresholds once, with ``mallopt`` (which also turns the dynamic
adjustment off): blocks up to :data:`MMAP_THRESHOLD` come from the heap, and the heap keeps up to
:data:`TRIM_THRESHOLD` of free memory instead of returning it, growing :data:`TOP_PAD` at a time.
Freed tensors are then reused without faults. The cost is memory: the process keeps what it
freed, about the peak of one training step, which a training run reaches on every step anyway.

``auto`` is on for CPU runs where malloc is glibc's; off on CUDA (device memory has its own
caching allocator) and where another allocator replaced it (``LD_PRELOAD`` of jemalloc or
tcmalloc, which users choose for the same reason). The setting is process-wide and stays for the
life of the process (runs of a sweep in one process share it).
"""
import ctypes
import sys

from ..errors import ConfigError

#: glibc's malloc.h option numbers
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
#: Blocks up to this size come from the heap (glibc's largest allowed value on 64-bit).
MMAP_THRESHOLD = 32 << 20
#: The heap keeps up to this much free memory at its top instead of returning it.
TRIM_THRESHOLD = 1 << 30
#: The heap grows by this much more than a request needs.
TOP_PAD = 64 << 20
SETTINGS = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD))

#: The decision of the first run in this process that tuned malloc (None: none did).
_tuned = {"by": None}


def _mib(n):
    return f"{n >> 20} MiB" if n < 1 << 30 else f"{n >> 30} GiB"


def glibc_malloc():
    """The C library, if malloc in this process is glibc's; else (None, why not)."""
    if not sys.platform.startswith("linux"):
        return None, f"not Linux ({sys.platform})"
    try:
        process = ctypes.CDLL(None)
        libc = ctypes.CDLL("libc.so.6")
    except OSError as e:
        return None, f"no glibc ({e})"
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None, "the C library is not glibc"
    address = ctypes.cast(process.malloc, ctypes.c_void_p).value
    if address != ctypes.cast(libc.malloc, ctypes.c_void_p).value:
        return None, "malloc is not glibc's (another allocator is preloaded)"
    return libc, None


def decide(setting, device_type, libc_lookup=glibc_malloc):
    """(on, libc, reason) for speed.malloc=setting on a device of type ``device_type``.
    ConfigError (one line, exit 2) when ``true`` cannot be honoured."""
    setting = str(setting).lower()
    if setting == "false":
        return False, None, "speed.malloc=false"
    if device_type != "cpu":
        if setting == "true":
            raise ConfigError("speed.malloc", "true", f"applies to CPU runs (device is {device_type})")
        return False, None, f"auto: off on {device_type}"
    libc, why_not = libc_lookup()
    if libc is None:
        if setting == "true":
            raise ConfigError("speed.malloc", "true", f"needs glibc's malloc: {why_not}")
        return False, None, f"auto: off: {why_not}"
    return True, libc, ("speed.malloc=true" if setting == "true" else "auto: on (CPU, glibc)")


def apply(setting, device_type, libc_lookup=glibc_malloc):
    """Decide speed.malloc and, when on, set glibc's thresholds (once per process). Returns the
    decision as metrics.json records it."""
    on, libc, reason = decide(setting, device_type, libc_lookup)
    if not on:
        if _tuned["by"]:
            return f"{reason} (malloc stays tuned: an earlier run in this process set it)"
        return f"off: {reason}"
    described = (f"mmap threshold {_mib(MMAP_THRESHOLD)}, trim threshold "
                 f"{_mib(TRIM_THRESHOLD)}, top pad {_mib(TOP_PAD)}")
    if _tuned["by"] is None:
        failed = [option for option, value in SETTINGS if libc.mallopt(option, value) != 1]
        if failed:
            raise RuntimeError(f"glibc's mallopt refused options {failed}")
        _tuned["by"] = reason
    return f"on: {reason}: {described}"
