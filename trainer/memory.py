"""Keep freed memory in the process for reuse: large arrays then cost no fresh page faults (torch-free).

glibc serves every allocation above its mmap threshold (at most 32 MiB by its own rules) with a fresh
mmap and returns it to the system when freed, so each dataset read, shard copy or per-epoch shuffle of a
large matrix faults its pages in again. On the virtual machines measured here that first touch is
the largest cost after parsing: reading a 60,000 x 784 CSV took 1.3-1.45x pandas' parse with the
default allocator and 1.06-1.08x with freed memory kept (bench/trainer.py prints both). A process that
reads and trains over and over, like a peer, gains; the price is that its resident size stays at its
peak instead of shrinking between tasks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

# mallopt(3) parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_GIB = 1 << 30
_INT_MAX = (1 << 31) - 1

_applied: int | None = None


def keep_freed_memory(largest: int = _GIB) -> bool:
    """Serve allocations up to `largest` bytes from the reusable heap and never trim it (process-wide).

    Returns whether the allocator took the settings: False where the C library is not glibc (musl,
    macOS, Windows), which then keeps its own behaviour. Calling it again is harmless.
    """
    global _applied
    if _applied is not None:
        return _applied == largest
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # The mmap threshold first: an older glibc may refuse one this high, and then nothing has changed.
    if not mallopt(_M_MMAP_THRESHOLD, largest):
        return False
    mallopt(_M_TRIM_THRESHOLD, min(2 * largest, _INT_MAX))
    _applied = largest
    return True
