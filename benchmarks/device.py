"""The device the benchmark runs on and the machine around it: choosing it, waiting for it, freeing it, naming it."""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import sys
from pathlib import Path

import torch


def pick_device(name: str) -> torch.device:
    """--device: auto → cuda when available."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free what the last variant left: garbage, compiled-graph caches, cached CUDA blocks."""
    gc.collect()
    if "torch._dynamo" in sys.modules:  # only loaded once something was compiled
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cpu_model() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, str]:
    """CPU, GPU and software versions, for the report."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu": f"{cpu_model()} ({cores} cores available, {os.cpu_count()} in the machine)",
        "gpu": "none",
        "software": f"Python {platform.python_version()}, torch {torch.__version__}, "
                    f"{torch.get_num_threads()} intra-op threads",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
        info["software"] += f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    return info
