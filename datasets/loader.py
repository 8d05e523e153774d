"""Deterministic batch loading: what a step sees is a pure function of (seed, epoch, batch position).

The sampler yields whole batches as ``(epoch, indices)`` keys and `BatchedDataset` turns a key into a
transformed batch, so the batch order comes from a (seed, epoch)-seeded permutation and each sample's
augmentation from (seed, epoch, index). Nothing depends on worker RNG, on the number of workers or on the
global torch RNG, which is what lets a resumed run see the same data as an uninterrupted one
(bit-identical resume, every sample exactly once per epoch).
"""
from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ctkd.preemption import STOP_SIGNALS  # what stops a run: the training process handles them

from .base import DataSource
from .hashing import seed_for

BatchKey = tuple[int, list[int], int]  # (epoch, this rank's sample indices, samples in the whole global batch)


class Batch(NamedTuple):
    """One rank's share of a global batch."""

    images: Tensor  # float32 (B, 3, H, W), normalised (and augmented for training)
    targets: Tensor  # int64 (B,) class labels
    indices: Tensor  # int64 (B,) positions of the samples in the dataset (CRD's memory bank is indexed by them)
    global_size: int  # samples in the global batch over all ranks (the sampler knows it: no collective needed)


def shard_sizes(global_size: int, world_size: int) -> list[int]:
    """How many samples of a global batch each rank takes (numpy.array_split sizes: the first ranks get +1)."""
    base, extra = divmod(global_size, world_size)
    return [base + (1 if rank < extra else 0) for rank in range(world_size)]


class EpochBatchSampler(Sampler[BatchKey]):
    """Yields ``(epoch, indices)`` for this rank's share of every global batch of the current epoch.

    The epoch's order is a permutation seeded by (seed, epoch) when `shuffle`, else 0..N-1, and is cut into
    global batches of `batch_size`. Rank r takes the r-th contiguous piece of each global batch, so the ranks'
    pieces concatenated in rank order are exactly the world-size-1 batch. The last partial global batch (kept
    unless `drop_last`) is split as evenly as numpy.array_split would: no sample is dropped or duplicated,
    every rank runs the same number of steps, and a rank's last piece may be smaller (empty if fewer samples
    than ranks remain).

    Call `set_epoch` before iterating each epoch; the epoch is not advanced automatically. `set_epoch(epoch,
    start_batch=k)` starts that epoch's iteration at its batch k (a run resumed after k steps of the epoch): the
    batches are the same as those of the whole epoch from k on, and `len` stays the whole epoch's.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or num_samples < 0:
            raise ValueError(f"batch_size must be >= 1 and num_samples >= 0, got {batch_size} and {num_samples}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} and world_size {world_size}")
        if batch_size % world_size:
            raise ValueError(
                f"the global batch_size {batch_size} is not divisible by world_size {world_size}: every rank "
                "needs an equal share of each batch (choose a batch_size that is a multiple of world_size)"
            )
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.shuffle, self.drop_last, self.rank, self.world_size = shuffle, drop_last, rank, world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch to iterate next, and the batch its iteration starts at (0: the whole epoch)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}] (the batches of an epoch), got {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Number of batches in an epoch."""
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def order(self) -> Tensor:
        """The epoch's global sample order, (num_samples,) int64."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        gen = torch.Generator().manual_seed(seed_for(self.seed, self.epoch))
        return torch.randperm(self.num_samples, generator=gen)

    def _shard(self, global_batch: Tensor) -> Tensor:
        """This rank's contiguous piece of a global batch (see `shard_sizes`)."""
        sizes = shard_sizes(global_batch.numel(), self.world_size)
        start = sum(sizes[: self.rank])
        return global_batch[start : start + sizes[self.rank]]

    def __iter__(self) -> Iterator[BatchKey]:
        order = self.order()
        for b in range(self.start_batch, len(self)):
            global_batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.epoch, self._shard(global_batch).tolist(), global_batch.numel()


class BatchedDataset(Dataset[Batch]):
    """Map-style dataset whose items are whole batches, keyed by ``(epoch, indices, global_size)``.

    ``dataset[(epoch, indices, global_size)]`` returns a `Batch`: float32 (B, 3, H, W) normalised images (with
    the train augmentation of that epoch when `train`), int64 (B,) labels and the indices. It is a pure function
    of the key, holding no epoch state, so it works unchanged in (persistent) worker processes. The images come
    from the source's `load_batch`, so a source that decodes files does it here, in the workers.
    """

    def __init__(self, dataset: DataSource, *, train: bool, seed: int) -> None:
        self.dataset, self.train, self.seed = dataset, train, seed

    def __getitem__(self, key: tuple[int, Sequence[int], int]) -> Batch:
        epoch, indices, global_size = key
        idx = torch.as_tensor(indices, dtype=torch.int64)
        images = self.dataset.load_batch(idx, epoch=epoch, train=self.train, seed=self.seed)
        if images.is_cuda:  # the dataset lives on the GPU: indices follow from pinned memory, without a host sync
            idx = idx.pin_memory().to(images.device, non_blocking=True)
        return Batch(images, self.dataset.targets[idx], idx, global_size)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: workers ignore SIGTERM, SIGUSR1 and SIGINT.

    SLURM and Kubernetes signal the whole process group (SIGTERM; SLURM's warning signal, here SIGUSR1), and a
    terminal's Ctrl-C sends SIGINT to it; if workers die of it the main process crashes at once ("DataLoader
    worker ... killed by signal") instead of handling the signal itself. Workers still exit through the loader's
    shutdown protocol, and torch's watchdog ends them if the main process dies.
    """
    del worker_id
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def build_loader(
    dataset: DataSource,
    *,
    batch_size: int,
    train: bool,
    seed: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    persistent_workers: bool = False,
) -> DataLoader:
    """A DataLoader over `dataset` yielding `Batch`es; see `EpochBatchSampler` for sharding.

    `batch_size` is the global batch (split over `world_size` ranks). Train loaders shuffle and augment;
    eval loaders keep the file order and only normalise. The last partial batch is kept, as the authors do.
    The caller must call ``loader.sampler.set_epoch(epoch)`` before each training epoch: the epoch picks both
    the permutation and the augmentation (eval loaders ignore it). `persistent_workers` applies only when
    `num_workers` > 0.
    """
    sampler = EpochBatchSampler(
        len(dataset), batch_size, seed=seed, shuffle=train, rank=rank, world_size=world_size
    )
    return DataLoader(
        BatchedDataset(dataset, train=train, seed=seed),
        batch_size=None,  # the sampler yields whole batches
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
        persistent_workers=persistent_workers and num_workers > 0,
        # DataLoader draws a worker base seed per iterator; a private generator keeps that draw from
        # advancing the global torch RNG, which would shift dropout etc. after a mid-epoch resume.
        generator=torch.Generator().manual_seed(seed),
    )
