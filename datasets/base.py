"""The in-memory image dataset every builder returns, and the error raised for unusable data."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ctkd.errors import UserError


class DatasetError(UserError, ValueError):
    """Dataset files are missing, unreadable or malformed.

    A ValueError because the fix is a different configuration value or different files (``data.root``,
    ``data.download``), not a different program. The message always names the absolute path concerned, what
    was expected there and how to get it.
    """


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A whole split held in memory as uint8 CHW images plus int64 labels.

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
