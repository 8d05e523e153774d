"""The benchmark's inputs: the training split every variant reads, whole epochs of a loader, a random teacher file."""
from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ctkd import datasets, models

NUM_CLASSES = 100


@dataclass
class Data:
    """The training split every variant uses, and how to get the same split from a ctkd config."""

    description: str
    split: datasets.ImageDataset  # uint8 (N, 3, 32, 32) images, int64 labels, normalisation constants

    @property
    def images(self) -> Tensor:
        """uint8 (N, 3, 32, 32)."""
        return self.split.images

    @property
    def targets(self) -> Tensor:
        """int64 (N,)."""
        return self.split.targets

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean of the [0, 1] pixels."""
        return tuple(self.split.mean)

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel standard deviation of the [0, 1] pixels."""
        return tuple(self.split.std)


def cifar_present(root: str) -> bool:
    """Whether CIFAR-100's training pickle is under `root`."""
    return (Path(root) / "cifar-100-python" / "train").is_file()


def data_overrides(args: argparse.Namespace) -> tuple[list[str], str]:
    """Config overrides selecting the benchmark's data, and a description of it."""
    if cifar_present(args.data_root):
        return [f"data.root={args.data_root}", "data.name=cifar100"], f"CIFAR-100 training set from {args.data_root}"
    size = synthetic_size(args)
    overrides = [
        "data.name=synthetic", f"data.num_classes={NUM_CLASSES}", f"data.train_size={size}",
        f"data.test_size={max(args.batch_size, 16)}",
    ]
    return overrides, (f"synthetic ({NUM_CLASSES} classes, {size:,} training images; no CIFAR-100 under "
                       f"{args.data_root})")


def synthetic_size(args: argparse.Namespace) -> int:
    """--synthetic-size rounded up to a whole number of batches (so no recompile for a short last batch)."""
    size = args.synthetic_size if args.synthetic_size is not None else 4 * args.batch_size
    return max(1, math.ceil(size / args.batch_size)) * args.batch_size


def load_data(args: argparse.Namespace) -> Data:
    """The training split (CIFAR-100 if present, else synthetic) as ctkd builds it."""
    description = data_overrides(args)[1]
    if cifar_present(args.data_root):
        split = datasets.build_dataset("cifar100", root=args.data_root, train=True)
    else:
        split = datasets.build_dataset(
            "synthetic", root="unused", train=True, num_classes=NUM_CLASSES, train_size=synthetic_size(args)
        )
    assert isinstance(split, datasets.ImageDataset)  # both are held in memory
    return Data(description, split)


def save_random_teacher(name: str, folder: Path) -> Path:
    """A randomly initialised `name` saved as a bare state_dict (what a teacher file may hold)."""
    torch.manual_seed(0)
    path = folder / f"{name}_random.pth"
    if not path.exists():
        torch.save(models.build_model(name, num_classes=NUM_CLASSES).state_dict(), path)
    return path


class EpochFeed:
    """Batches from whole epochs of a loader, restarting it (and setting its epoch, if it has one) when exhausted."""

    def __init__(self, loader: Any, first_epoch: int = 1) -> None:
        """Feed from `loader`, starting at epoch `first_epoch`."""
        self.loader, self.epoch = loader, first_epoch
        self.images = 0
        self.first_device: torch.device | None = None
        self._iterator: Iterator[Any] | None = None

    def _start_epoch(self) -> None:
        """Select the epoch (ctkd's sampler needs it) and start a new pass."""
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        elif hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        self._iterator = iter(self.loader)

    def take(self, count: int) -> Iterator[Any]:
        """The next `count` batches, counting their images."""
        produced = 0
        while produced < count:
            if self._iterator is None:
                self._start_epoch()
            try:
                batch = next(self._iterator)  # type: ignore[arg-type]
            except StopIteration:
                self._iterator, self.epoch = None, self.epoch + 1
                continue
            images = batch[0]
            if self.first_device is None:
                self.first_device = images.device
            self.images += int(images.shape[0])
            produced += 1
            yield batch
