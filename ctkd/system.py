"""Process-level tuning of the host allocator for training loops on CPU tensors.

glibc's malloc hands every allocation above 128 KB (a dynamic threshold) to mmap and gives freed memory back to the
kernel at once, so each training step of a CIFAR network maps and faults in the same activation buffers again: tens of
thousands of page faults per step on CPU (docs/benchmarks.md). Raising the mmap and trim thresholds keeps those buffers
in the heap for reuse, the effect of MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set before a launch, applied from
inside the process. Results are unchanged: only where the memory comes from differs.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD = -1  # mallopt parameters of glibc's malloc.h
_M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # allocations below 1 GiB come from the heap, and up to 1 GiB of freed heap stays mapped


def tune_malloc(keep_bytes: int = KEEP_BYTES) -> bool:
    """Raise glibc's mmap and trim thresholds to `keep_bytes`; False (nothing done) off glibc or when refused."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, keep_bytes)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, keep_bytes))
