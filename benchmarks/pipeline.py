"""Input pipelines: the authors' per-image PIL transforms against ctkd's batched ones, and their micro-benchmark."""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from benchmarks.data import Data, EpochFeed
from benchmarks.device import synchronize
from benchmarks.results import Table
from ctkd import datasets
from ctkd.datasets.transforms import train_transform


class ReferenceCIFAR(Dataset):
    """torchvision.datasets.CIFAR100's layout: uint8 HWC numpy images, int labels, a PIL image per sample."""

    def __init__(self, data: Data, transform: Callable[[Image.Image], Tensor]) -> None:
        """The images of `data` as torchvision holds them, each turned into a tensor by `transform`."""
        self.data = data.images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, 32, 32, 3) uint8
        self.targets = data.targets.tolist()
        self.transform = transform

    def __len__(self) -> int:
        """The number of images."""
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Image `index` through PIL and the transform, and its label."""
        image = self.transform(Image.fromarray(self.data[index]))
        return image, self.targets[index]


def reference_transform(data: Data) -> T.Compose:
    """The authors' CIFAR training transform, applied per image."""
    return T.Compose([
        T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(data.mean, data.std),
    ])


def reference_loader(data: Data, batch_size: int, workers: int) -> DataLoader:
    """The authors' training loader: shuffled, last batch kept, workers re-forked every epoch."""
    dataset = ReferenceCIFAR(data, reference_transform(data))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)


class BatchedTransformLoader:
    """ctkd's batched train_transform over shuffled batches of uint8 images kept where `images` lives."""

    def __init__(self, data: Data, batch_size: int, device: torch.device) -> None:
        """The images and labels of `data` copied to `device`, served in batches of `batch_size`."""
        self.images, self.batch_size, self.device = data.images.to(device), batch_size, device
        self.targets = data.targets.to(device)
        self.mean, self.std, self.epoch = data.mean, data.std, 1

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the augmentation."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """One shuffled epoch of augmented batches."""
        order = torch.randperm(len(self.images), device=self.device)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            images = train_transform(self.images[idx], idx, seed=0, epoch=self.epoch, mean=self.mean, std=self.std)
            yield images, self.targets[idx]


def time_feed(feed: EpochFeed, batches: int, device: torch.device | None = None) -> float:
    """Images/s of `batches` batches of `feed` after one warm-up batch (worker start-up is not timed)."""
    for _ in feed.take(1):
        pass
    start_images, start = feed.images, time.perf_counter()
    for _ in feed.take(batches):
        pass
    if device is not None:
        synchronize(device)
    return (feed.images - start_images) / (time.perf_counter() - start)


def on_device_rate(data: Data, args: argparse.Namespace, device: torch.device) -> str:
    """The batched transforms' images/s on the GPU, or why they could not run there."""
    try:
        on_device = EpochFeed(BatchedTransformLoader(data, args.batch_size, device))
        return f"{time_feed(on_device, args.pipeline_batches, device):,.0f}"
    except Exception as err:  # noqa: BLE001 - reported in the table: the CPU rows still stand
        return f"n/a ({type(err).__name__}: {str(err).splitlines()[0][:100]})"


def pipeline_benchmark(data: Data, args: argparse.Namespace, device: torch.device) -> list[list[str]]:
    """Images/s of the per-image PIL pipeline against ctkd's batched transforms (CPU, and the device with CUDA)."""
    n, rows = args.pipeline_batches, []
    pil = EpochFeed(reference_loader(data, args.batch_size, args.workers))
    rows.append([f"per-image PIL transforms (torchvision), DataLoader, {args.workers} workers",
                 f"{time_feed(pil, n):,.0f}"])
    batched = EpochFeed(BatchedTransformLoader(data, args.batch_size, torch.device("cpu")))
    rows.append(["ctkd train_transform, batched, main process, CPU", f"{time_feed(batched, n):,.0f}"])
    loader = datasets.build_loader(data.split, batch_size=args.batch_size, train=True, seed=0,
                                   num_workers=args.workers, persistent_workers=True)
    rows.append([f"ctkd loader (datasets.build_loader), {args.workers} workers",
                 f"{time_feed(EpochFeed(loader), n):,.0f}"])
    del loader  # its persistent workers end here, before the GPU row
    if device.type == "cuda":
        rows.append([f"ctkd train_transform, batched, on {torch.cuda.get_device_name(device)}",
                     on_device_rate(data, args, device)])
    return rows


def pipeline_table(data: Data, args: argparse.Namespace, device: torch.device) -> Table:
    """--pipeline's table: title, headers and rows."""
    return (f"Input pipeline, batch {args.batch_size}, {args.pipeline_batches} batches after one warm-up batch",
            ["pipeline", "images/s"], pipeline_benchmark(data, args, device))
