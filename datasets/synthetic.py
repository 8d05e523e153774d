"""A CIFAR-shaped classification task generated from a seed, for tests and debug runs without downloads.

Each class is a smooth random prototype: a few low-frequency colour waves on a 40x40 canvas. A sample is a
random 32x32 window of its class prototype (a shift of up to ±4 pixels), with random contrast and brightness,
a random admixture of another class's prototype, and pixel noise. A small CNN learns it well above chance in
a minute of CPU training without saturating, so a teacher still has something to teach a student.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ctkd.options import DataOptions, spec

from .base import DATASETS, ImageDataset
from .cifar import MEAN as CIFAR_MEAN
from .cifar import STD as CIFAR_STD
from .hashing import seed_for

SIZE = 32
_CANVAS = SIZE + 8  # room for the ±4-pixel shift
_WAVES = 4  # per class prototype
_MAX_FREQUENCY = 3  # cycles per canvas: keeps prototypes smooth
# Difficulty knobs (tuned so a resnet8 reaches roughly 60-80% in a minute of CPU training on 10 classes).
_NOISE_STD = 0.5  # per pixel
_CLUTTER_STD = 1.0  # smooth random field: nuisance structure at the prototypes' own scale
_CLUTTER_GRID = 6  # the clutter is a random 6x6 field upsampled to 32x32
_DISTRACTOR_MAX = 1.2  # above 1 the other class dominates: about 1/6 of the samples are mislabelled by design
_CONTRAST = (0.5, 1.5)
_BRIGHTNESS_STD = 0.3
# Generation streams, so prototypes, train and test samples come from independent generators.
_PROTOTYPE_STREAM, _TRAIN_STREAM, _TEST_STREAM = 0, 1, 2


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(seed, stream))


def _prototypes(num_classes: int, gen: torch.Generator) -> Tensor:
    """(num_classes, 3, 40, 40) float prototypes with zero mean and unit std per class, plus a class colour."""
    coords = torch.arange(_CANVAS, dtype=torch.float32) / _CANVAS
    freqs = torch.randint(-_MAX_FREQUENCY, _MAX_FREQUENCY + 1, (num_classes, _WAVES, 2), generator=gen).float()
    freqs[..., 0] += (freqs.abs().sum(-1) == 0).float()  # no constant "wave"
    phases = torch.rand(num_classes, _WAVES, 1, 1, generator=gen) * 2 * math.pi
    angle = 2 * math.pi * (freqs[..., 0, None, None] * coords[:, None] + freqs[..., 1, None, None] * coords[None, :])
    waves = torch.cos(angle + phases)  # (K, W, 40, 40)
    colours = torch.randn(num_classes, 3, _WAVES, generator=gen)  # each wave gets its own colour mix
    protos = torch.einsum("kcw,kwhv->kchv", colours, waves)
    protos = (protos - protos.mean((1, 2, 3), keepdim=True)) / protos.std((1, 2, 3), keepdim=True)
    return protos + 0.5 * torch.randn(num_classes, 3, 1, 1, generator=gen)


def _windows(protos: Tensor, labels: Tensor, gen: torch.Generator) -> Tensor:
    """A randomly shifted 32x32 window of each sample's prototype: (N, 3, 32, 32)."""
    shifts = _CANVAS - SIZE + 1
    offset = torch.randint(0, shifts * shifts, (labels.shape[0],), generator=gen)  # (top, left) as one number
    out = torch.empty(labels.shape[0], 3, SIZE, SIZE)
    # One slice copy per shift position (81 of them) is several times faster than a per-pixel gather.
    order = torch.argsort(offset)
    groups = order.split(torch.bincount(offset, minlength=shifts * shifts).tolist())
    for position, members in enumerate(groups):
        top, left = divmod(position, shifts)
        out[members] = protos[labels[members], :, top : top + SIZE, left : left + SIZE]
    return out


def _smooth_noise(size: int, gen: torch.Generator) -> Tensor:
    """(size, 3, 32, 32) random fields: a coarse grid of N(0, 1) values, bilinearly upsampled.

    Bilinear upsampling is separable, so it is done as two small matrix products (much faster than
    F.interpolate on a large batch, same values).
    """
    coarse = torch.randn(size, 3, _CLUTTER_GRID, _CLUTTER_GRID, generator=gen)
    basis = torch.eye(_CLUTTER_GRID).unsqueeze(1)  # (grid, 1, grid): each grid point alone
    upsample = F.interpolate(basis, size=SIZE, mode="linear", align_corners=False).squeeze(1).T  # (32, grid)
    return upsample @ coarse @ upsample.T


def _samples(protos: Tensor, size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """`size` class-balanced uint8 images and their labels drawn from `gen`."""
    num_classes = protos.shape[0]
    labels = (torch.arange(size) % num_classes)[torch.randperm(size, generator=gen)]  # balanced to ±1
    # A different class's prototype mixed in at a random weight, so classes overlap and accuracy stays < 100%.
    others = (labels + torch.randint(1, num_classes, (size,), generator=gen)) % num_classes
    weight = torch.rand(size, 1, 1, 1, generator=gen) * _DISTRACTOR_MAX
    low, high = _CONTRAST
    contrast = low + (high - low) * torch.rand(size, 1, 1, 1, generator=gen)
    brightness = _BRIGHTNESS_STD * torch.randn(size, 3, 1, 1, generator=gen)
    # In-place steps: the split is the only large tensor, so no full-size temporaries are made.
    x = _windows(protos, labels, gen).add_(_windows(protos, others, gen).mul_(weight))
    x.mul_(contrast).add_(brightness)
    x.add_(_smooth_noise(size, gen).mul_(_CLUTTER_STD))
    x.add_(torch.randn(x.shape, generator=gen).mul_(_NOISE_STD))
    images = x.mul_(48).add_(128).round_().clamp_(0, 255).to(torch.uint8)  # ±2.7 std fits in 0..255
    return images, labels


@dataclass(frozen=True)
class SyntheticData(DataOptions):
    """Random class-conditional CIFAR-shaped data for tests and debug runs (nothing to download)."""

    name: str = "synthetic"
    num_classes: int = spec(10, ge=2)  # number of classes
    train_size: int = spec(2000, ge=1)  # number of training samples
    test_size: int = spec(500, ge=1)  # number of test samples
    seed: int = 0  # seed of the generator that draws the images (independent of the run's seed)


@DATASETS.register("synthetic", options=SyntheticData)
def synthetic(
    *,
    root: str,
    train: bool,
    download: bool = False,
    num_classes: int = 10,
    train_size: int = 5000,
    test_size: int = 1000,
    seed: int = 0,
) -> ImageDataset:
    """One split of the synthetic task; `root` and `download` are accepted for a uniform builder call but unused.

    The same `seed` gives the same class prototypes for both splits; train and test samples are independent
    draws from them. Normalisation uses the CIFAR-100 constants so the train/eval path is the same as CIFAR's.
    """
    del root, download  # nothing is read or fetched
    if num_classes < 2:
        raise ValueError(f"synthetic dataset: num_classes must be at least 2, got {num_classes}")
    size = train_size if train else test_size
    if size < 1:
        raise ValueError(f"synthetic dataset: {'train' if train else 'test'}_size must be at least 1, got {size}")
    protos = _prototypes(num_classes, _generator(seed, _PROTOTYPE_STREAM))
    images, labels = _samples(protos, size, _generator(seed, _TRAIN_STREAM if train else _TEST_STREAM))
    return ImageDataset(
        images=images,
        targets=labels,
        num_classes=num_classes,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        classes=tuple(f"class_{k}" for k in range(num_classes)),
    )
