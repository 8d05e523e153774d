"""The random resized crop of folder datasets: torchvision's RandomResizedCrop algorithm, with every random number
drawn from a hash of (seed, epoch, index), so the crops do not depend on workers, batching or resuming."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .hashing import hash_keys, splitmix64

CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults
CROP_RATIO = (3 / 4, 4 / 3)
_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 random boxes before its central fallback
_DRAWS_PER_ATTEMPT = 4  # area, log aspect ratio, top, left


def crop_draws(seed: int, epoch: int, indices: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The random numbers of the train transform of samples `indices` in `epoch`.

    Sub-stream k of sample i is splitmix64(hash(seed, epoch, i) XOR k): stream 0 gives the flip (its top bit), streams
    1..40 the four uniforms of each of the 10 crop attempts (53-bit floats in [0, 1)).

    Returns:
        (uniforms, flip): float64 (B, 10, 4) and bool (B,).
    """
    key = hash_keys(seed, epoch, indices.reshape(-1))
    streams = splitmix64(key[:, None] ^ torch.arange(1 + _ATTEMPTS * _DRAWS_PER_ATTEMPT))
    flip = streams[:, 0] < 0
    mantissa = (streams[:, 1:] >> 11) & ((1 << 53) - 1)  # the top 53 bits, as a non-negative int64
    uniforms = mantissa.to(torch.float64) * 2.0**-53
    return uniforms.reshape(-1, _ATTEMPTS, _DRAWS_PER_ATTEMPT).numpy(), flip.numpy()


def crop_box(
    uniforms: np.ndarray, height: int, width: int, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with given random numbers: (top, left, h, w) of the crop.

    Args:
        uniforms: (10, 4) numbers in [0, 1): per attempt the area fraction, log aspect ratio, top and left draws.
        height, width: size of the image.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height), sampled uniformly in log space.
    """
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for u_area, u_ratio, u_top, u_left in uniforms.tolist():
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_low + (log_high - log_low) * u_ratio)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u_top * (height - h + 1)), height - h)
            left = min(int(u_left * (width - w + 1)), width - w)
            return top, left, h, w
    # torchvision's fallback: the largest central crop whose aspect ratio is within `ratio`
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop_params(
    seed: int,
    epoch: int,
    index: int,
    height: int,
    width: int,
    scale: Sequence[float] = CROP_SCALE,
    ratio: Sequence[float] = CROP_RATIO,
) -> tuple[int, int, int, int, bool]:
    """(top, left, h, w, flip) of the train transform of sample `index` (an image of `height` x `width`) in `epoch`.

    A pure function of its arguments: torchvision's RandomResizedCrop algorithm fed with `crop_draws`.
    """
    uniforms, flip = crop_draws(seed, epoch, torch.tensor([index]))
    return (*crop_box(uniforms[0], height, width, scale, ratio), bool(flip[0]))
