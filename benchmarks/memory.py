"""Peak memory of a measured block: CUDA's allocator statistics, or on CPU the process's RSS sampled in a thread."""
from __future__ import annotations

import gc
import os
import sys
import threading

import torch

MIB = 2**20


def current_rss() -> int:
    """Resident set size of this process in bytes (psutil if installed, else /proc, else the peak so far)."""
    try:
        import psutil  # type: ignore[import-untyped]

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakMemory:
    """Peak memory of a block: CUDA max_memory_allocated, or on CPU the peak RSS above the level at entry."""

    def __init__(self, device: torch.device, interval_s: float = 0.01) -> None:
        """Measure on `device`; on CPU the RSS is sampled every `interval_s` seconds."""
        self.device, self.interval_s = device, interval_s
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        """Start from a clean slate: garbage collected, CUDA peaks reset, or the CPU sampler started."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.base = self.peak = current_rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        """Background sampler of the RSS (CPU)."""
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, current_rss())

    def __exit__(self, *exc: object) -> None:
        """Stop the CPU sampler, with a last sample so that a block shorter than the interval still counts."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, current_rss())

    @property
    def bytes(self) -> int:
        """The peak: allocated bytes on CUDA, RSS growth on CPU."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return self.peak - self.base

    def reserved(self) -> int:
        """Peak bytes reserved by the CUDA caching allocator (0 on CPU)."""
        return int(torch.cuda.max_memory_reserved(self.device)) if self.device.type == "cuda" else 0
