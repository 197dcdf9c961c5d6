"""The C allocator's settings for training on a CPU: keep freed memory for reuse.

A CPU tensor's memory comes from the C library's ``malloc``. With glibc's
defaults, memory freed at the top of the heap beyond a threshold is given
back to the system, and large blocks are mapped afresh for each allocation;
either way the next weight-sized tensor (a micro-batch's gradient, the
optimizer's temporaries) starts on new pages that the kernel faults in and
zeroes one by one. Training frees and allocates such tensors at every
micro-batch and update: at 3 x 2048^2 float32 weights per stage that cost
as much again as the backward (docs/runtime.md, "Throughput grid, third
pass").

:func:`keep_freed_memory` raises both thresholds (``mallopt``), so freed
blocks stay in the heap and are reused. It changes the whole process, once
and for good: the process then holds on to its peak heap rather than giving
memory back. The emulator calls it when it first trains, the distributed
runtime when it is built (every rank, together); ``TIMEPREST_MALLOC=system``
leaves the allocator as it is. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform

from timeprest.errors import ConfigError

ENV = "TIMEPREST_MALLOC"

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_NEVER_TRIM = 2**31 - 1  # an int: the largest value mallopt takes
_MMAP_AT = 1 << 30  # blocks below 1 GiB come from the heap
_MMAP_MAX_DOCUMENTED = 32 << 20  # mallopt(3): DEFAULT_MMAP_THRESHOLD_MAX on 64-bit

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (once per process); whether it is set.

    False where the C library is not glibc, where ``TIMEPREST_MALLOC=system``,
    or where ``mallopt`` refuses a value.
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    choice = os.environ.get(ENV, "keep").strip().lower()
    if choice not in ("keep", "system"):
        _done = None
        raise ConfigError(f"{ENV}={choice!r}: expected keep (the default) or system")
    if choice == "system" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return _done
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return _done
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # the mapping threshold first (setting either turns glibc's own adjustment off): 1 GiB
    # where this glibc takes it, else its documented maximum on 64-bit systems (32 MiB)
    if not mallopt(_M_MMAP_THRESHOLD, _MMAP_AT):
        mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX_DOCUMENTED)
    _done = bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
    return _done
