"""Process-level settings of a run: seeds, deterministic algorithms, torch.compile's mode and the host allocator.

The allocator: glibc's malloc hands every allocation above 128 KB (a dynamic threshold) to mmap and gives freed memory
back to the kernel at once, so each training step of a CIFAR network maps and faults in the same activation buffers
again: tens of thousands of page faults per step on CPU (docs/benchmarks.md). Raising the mmap and trim thresholds
keeps those buffers in the heap for reuse (the effect of MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set before a
launch, applied from inside the process). Results are unchanged: only where the memory comes from differs.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import random
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from ctkd.schema import Config

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


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so model initialisation is reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


CUBLAS_WORKSPACE_CONFIGS = (":4096:8", ":16:8")  # the settings under which cuBLAS is deterministic


def set_cublas_workspace() -> None:
    """CUBLAS_WORKSPACE_CONFIG for deterministic cuBLAS (runtime.deterministic), unless already set to a valid one."""
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in CUBLAS_WORKSPACE_CONFIGS:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIGS[0]


def set_determinism(cfg: Config, device: torch.device) -> None:
    """runtime.deterministic: deterministic algorithms everywhere (torch raises on an op that has none), and
    deterministic cuDNN without its benchmark; otherwise cuDNN's benchmark as runtime.cudnn_benchmark says."""
    deterministic = cfg.runtime.deterministic
    torch.use_deterministic_algorithms(deterministic)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = cfg.runtime.cudnn_benchmark and not deterministic


def resolve_compile_mode(setting: str, device: torch.device) -> str | None:
    """torch.compile's mode for `runtime.compile`, or None for no compilation (`auto`: `default` on CUDA only)."""
    if setting == "auto":
        return "default" if device.type == "cuda" else None
    return None if setting == "off" else setting
