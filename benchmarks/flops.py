"""Work and capacity: FLOPs per image of a KD step (FlopCounterMode) and the device's measured matmul peak."""
from __future__ import annotations

import time

import torch

from benchmarks.data import NUM_CLASSES
from benchmarks.device import synchronize
from ctkd import models


def forward_flops(name: str) -> int:
    """FLOPs of one image's forward pass of model `name` (FlopCounterMode, eval mode, on CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = models.build_model(name, num_classes=NUM_CLASSES).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(2, 3, 32, 32))
    return counter.get_total_flops() // 2


def step_flops_per_image(teacher_name: str, student_name: str) -> int:
    """FLOPs per image of a KD step: teacher forward + student forward and backward (≈ 3 forwards)."""
    return forward_flops(teacher_name) + 3 * forward_flops(student_name)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, seconds: float = 0.5) -> float:
    """FLOP/s of a timed square torch.mm of `size`² in `dtype` (after warm-up), over about `seconds`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    synchronize(device)
    start = time.perf_counter()
    torch.mm(a, b)
    synchronize(device)
    reps = max(3, int(seconds / max(time.perf_counter() - start, 1e-6)))
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    synchronize(device)
    return 2.0 * size**3 * reps / (time.perf_counter() - start)


def matmul_peaks(device: torch.device, size: int) -> dict[str, float]:
    """The peaks the rows are compared with: fp32, and bf16 on CUDA (its bf16 rows run at that peak)."""
    peaks = {"fp32": matmul_peak(device, torch.float32, size)}
    if device.type == "cuda":
        peaks["bf16"] = matmul_peak(device, torch.bfloat16, size)
    return peaks
