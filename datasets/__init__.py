"""Datasets: splits built by name (in memory, or folders of image files read per sample), deterministic loading.

Usage::

    train_set = build_dataset("cifar100", root="data", train=True, download=True)
    loader = build_loader(train_set, batch_size=64, train=True, seed=0, num_workers=2)
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)  # required: the epoch selects the permutation and the augmentation
        for images, targets, indices, global_size in loader:
            ...
"""
from __future__ import annotations

import inspect
from typing import Any

from ctkd.registry import import_submodules

from .base import DATASETS, DatasetError, DataSource, ImageDataset
from .folder import ImageFolderSource
from .loader import Batch, BatchedDataset, EpochBatchSampler, build_loader, shard_sizes

import_submodules(__name__, __path__)  # every dataset module registers its datasets

__all__ = [
    "DATASETS",
    "Batch",
    "BatchedDataset",
    "DataSource",
    "DatasetError",
    "EpochBatchSampler",
    "ImageDataset",
    "ImageFolderSource",
    "build_dataset",
    "build_loader",
    "shard_sizes",
]


def _check_builder_options(name: str, builder: Any, options: dict[str, Any]) -> None:
    """Reject option names the builder does not take, listing the ones it does (a typo is a config error)."""
    params = inspect.signature(builder).parameters
    accepted = sorted(set(params) - {"root", "train", "download"})
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f"dataset '{name}' has no option(s) {unknown}; its options are {accepted}")


def build_dataset(name: str, *, root: str, train: bool, download: bool = False, **options: Any) -> DataSource:
    """Build one split of the dataset registered as `name`.

    Args:
        name: registered name ("cifar100", "synthetic", "imagenet", "image_folder", ...); an unknown name raises a
            ValueError with close matches.
        root: folder holding (or receiving) the dataset files.
        train: the training split if True, else the test split.
        download: fetch the files if they are missing (datasets that have files to fetch).
        options: dataset-specific options, e.g. ``num_classes`` for "synthetic".

    Raises:
        DatasetError: files missing or malformed (the message names the path and the remedy).
    """
    builder = DATASETS.get(name)
    _check_builder_options(name, builder, options)
    return builder(root=root, train=train, download=download, **options)
