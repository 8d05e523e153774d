"""The dataset registry, the interface every dataset builder returns (`DataSource`), the in-memory `ImageDataset`
and `DatasetError`.

A data source answers "these samples of epoch e, transformed" with `load_batch`; `BatchedDataset` (datasets/loader.py)
calls it inside the DataLoader's workers, so a source may decode its samples there (datasets/folder.py reads image
files per sample) instead of holding the split in memory.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ctkd.errors import UserError
from ctkd.registry import Registry

from .transforms import eval_transform, train_transform

# Builders are called as builder(root=..., train=..., download=..., **options) and return a data source; each is
# registered with its config section, ``@DATASETS.register(name, options=...)`` (a ctkd.options.DataOptions
# subclass whose extra fields are the builder's options).
DATASETS = Registry("dataset")


class DatasetError(UserError, ValueError):
    """Dataset files are missing, unreadable or malformed.

    A ValueError because the fix is a different configuration value or different files (``data.root``,
    ``data.download``), not a different program. The message always names the absolute path concerned, what
    was expected there and how to get it.
    """


@runtime_checkable
class DataSource(Protocol):
    """One split of a dataset: labels up front, transformed images on demand.

    Sources travel to the DataLoader's worker processes (pickled under the spawn start method), so they hold
    light state: tensors, arrays, paths, numbers.
    """

    @property
    def num_classes(self) -> int:
        """Number of classes of the task (a split need not contain all of them)."""
        ...

    @property
    def classes(self) -> tuple[str, ...]:
        """Human-readable class names, `num_classes` of them; label k is ``classes[k]``."""
        ...

    @property
    def targets(self) -> Tensor:
        """int64 (N,) labels of all samples, in [0, num_classes) (CRD's memory bank needs them all at once)."""
        ...

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of a transformed sample, as `load_batch` returns it (train and eval alike)."""
        ...

    def __len__(self) -> int:
        """Number of samples N."""
        ...

    def load_batch(self, indices: Tensor, *, epoch: int, train: bool, seed: int) -> Tensor:
        """float32 (B, *image_shape) normalised images of the samples `indices` (int64 (B,)).

        With `train`, the augmentation of sample i is a pure function of (seed, epoch, i) (see `hashing`); without,
        the images are only normalised (and resized/cropped to `image_shape`), whatever the epoch and seed.
        """
        ...


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A whole split held in memory as uint8 CHW images plus int64 labels (a `DataSource`).

    Attributes:
        images: uint8 tensor of shape (N, 3, H, W), pixel values 0..255.
        targets: int64 tensor of shape (N,), class indices in [0, num_classes).
        num_classes: number of classes of the task (a split need not contain all of them).
        mean: per-channel mean of the [0, 1]-scaled pixels used for normalisation.
        std: per-channel standard deviation used for normalisation.
        classes: human-readable class names, ``num_classes`` of them.
    """

    images: Tensor
    targets: Tensor
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        # Builders validate user files themselves with path-naming errors; these are internal invariants.
        assert self.images.dtype == torch.uint8 and self.images.dim() == 4 and self.images.shape[1] == 3
        assert self.targets.dtype == torch.int64 and self.targets.shape == (self.images.shape[0],)
        assert len(self.classes) == self.num_classes and len(self.mean) == len(self.std) == 3

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(3, H, W): the transforms keep the stored size."""
        _, channels, height, width = self.images.shape
        return channels, height, width

    def to(self, device: torch.device | str) -> ImageDataset:
        """This split with images and labels on `device`: batches are then cropped, flipped and normalised there
        (bit-identical pixels: integer indexing and the same float operations), with no worker process."""
        return dataclasses.replace(self, images=self.images.to(device), targets=self.targets.to(device))

    def load_batch(self, indices: Tensor, *, epoch: int, train: bool, seed: int) -> Tensor:
        """Padded random crop + flip drawn from (seed, epoch, index) when `train`, then normalisation (`transforms`)."""
        if self.images.is_cuda and not indices.is_cuda:  # a pinned host copy goes to the GPU without a host sync
            indices = indices.pin_memory()
        indices = indices.to(self.images.device, non_blocking=True)
        images = self.images[indices]
        if train:
            return train_transform(images, indices, seed=seed, epoch=epoch, mean=self.mean, std=self.std)
        return eval_transform(images, mean=self.mean, std=self.std)


_EXAMPLES = 5  # file or folder names quoted in an error


def examples(names: Sequence[str]) -> str:
    """Up to five of `names`, sorted, and how many there are in all (for error messages)."""
    shown = ", ".join(sorted(names)[:_EXAMPLES])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > _EXAMPLES else shown
