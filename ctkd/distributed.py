"""Process-group set-up for torchrun (single node, multi-node, SLURM) and the collectives the trainer needs.

One process per device. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them the run is a single process and
every helper here is a no-op, so the same code path serves 1 and N processes.
"""
from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor, nn

from ctkd.datasets.hashing import seed_for
from ctkd.datasets.loader import shard_sizes
from ctkd.errors import ConfigError, UserError
from ctkd.locks import (
    RunLock,
    adopt_run_lock,
    check_free_space,
    lock_holder,
    lock_run,
    prepare_output_dir,
    try_lock_run,
)
from ctkd.logging import get_logger

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, metrics, TensorBoard and checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether a process group with more than one process is running."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    """An integer from the environment (set by torchrun)."""
    value = os.environ.get(name)
    return default if value is None else int(value)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The config's device choice for this process: 'auto' → cuda:LOCAL_RANK when CUDA is available, else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was requested but no CUDA device is available; use device=auto or cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device: str, timeout_s: float) -> DistributedContext:
    """Join the torchrun process group if there is one; pick this process's device.

    `device` is the config's choice (auto/cpu/cuda). Under torchrun each process takes cuda:LOCAL_RANK and NCCL on
    CUDA, or gloo on CPU. `timeout_s` bounds how long a collective waits for a dead or hung rank (torch's default is
    30 minutes), so one failing rank ends the whole job quickly.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    torch_device = resolve_device(device, local_rank)
    use_cuda = torch_device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=timedelta(seconds=timeout_s),
            device_id=torch_device if use_cuda else None,
        )
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=torch_device)


def shutdown_distributed(clean: bool = True) -> None:
    """Leave the process group; after a clean run first wait for every rank, so none tears down while another
    still sends (after an error there is no barrier: the other ranks may be gone)."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def get_rank() -> int:
    """This process's rank (0 for a single process)."""
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes in the job (1 for a single process)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def main_process_first(ctx: DistributedContext) -> Iterator[None]:
    """Run the body on rank 0 first, then on the other ranks (e.g. a download that the others then read)."""
    if not ctx.is_main:
        barrier()
    yield
    if ctx.is_main:
        barrier()


def all_reduce(tensor: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce over all ranks (no-op for a single process); returns `tensor`."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


def gather_batch(x: Tensor, global_size: int) -> Tensor:
    """All ranks' rows of a per-rank batch tensor, in rank order (= the single-process batch), with gradient.

    Losses that relate the samples of a batch to each other (PKT, SP, RKD, CRD's negatives) use it so that N
    processes compute the loss of the whole global batch, as one process does. Backward sums every rank's gradient
    into the rows it contributed; DDP's averaging then yields the gradient of the global loss. Shard sizes follow
    the sampler (`shard_sizes`), so uneven last batches need no extra collective.
    """
    world = get_world_size()
    if world == 1:
        return x
    sizes = shard_sizes(global_size, world)
    padded = torch.cat([x, x.new_zeros(max(sizes) - x.shape[0], *x.shape[1:])]) if x.shape[0] < max(sizes) else x
    parts = dist_nn.all_gather(padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is set on any rank (one all-reduce; just `flag` for a single process)."""
    if get_world_size() == 1:
        return flag
    tensor = torch.full((1,), 1.0 if flag else 0.0, device=device)
    return bool(all_reduce(tensor).item() > 0)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (small, picklable: an `epoch_state`, RNG states), in rank order; a collective under DDP,
    so every rank calls it (at checkpoints only)."""
    if not dist.is_initialized():
        return [obj]
    objects: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s value of `obj` on every rank (pickled; for small decisions such as a resume path)."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def decide_on_main(ctx: DistributedContext, decide: Callable[[], T], share: bool = False) -> T | None:
    """`decide()` on rank 0 alone; a UserError it raises is raised on every rank (so all stop together).

    Returns its value on rank 0 and None on the other ranks, or on every rank with `share` (a broadcast).
    """
    result, error = None, None
    if ctx.is_main:
        try:
            result = decide()
        except UserError as err:
            error = err
    if share:
        error, result = broadcast_object((error, result))
    else:
        error = broadcast_object(error)
    if error is not None:
        raise error
    return result


def _log_lock(lock: RunLock) -> None:
    """Say that the run directory is unprotected, or whose stale lock was taken over."""
    if lock.unsupported:
        get_logger().warning(f"warning: {lock.directory} is not locked ({lock.unsupported}): a second run started "
                             "into it would not be refused")
    elif lock.takeover_message():
        get_logger().warning(lock.takeover_message())


def claim_run_directory(directory: str | Path, ctx: DistributedContext, held: RunLock | None = None) -> RunLock | None:
    """Make rank 0 the one writer of `directory` for the run's life: its lock (`held` if the caller already holds
    it, else the one a parent process passed in CTKD_RUN_LOCK_FD, else a new one), a writable directory and a
    minimum of free space. Every rank raises the same error when this fails (another run holds the directory,
    it cannot be written, its disk is full). Returns the lock on rank 0 (the caller releases it), None elsewhere.
    """
    def claim() -> RunLock:
        existed = Path(directory).exists()
        prepare_output_dir(directory)
        lock = held or adopt_run_lock(directory) or lock_run(directory)
        lock.created = lock.created or not existed
        try:
            check_free_space(directory)
        except UserError:
            if held is None:
                lock.release()
            raise
        _log_lock(lock)
        return lock

    return decide_on_main(ctx, claim)


WAIT_POLL_S = 2.0  # how often a run waiting for another run's directory looks again


def wait_for_run_directory(directory: str | Path, ctx: DistributedContext, what: str,
                           poll_s: float = WAIT_POLL_S) -> RunLock | None:
    """The lock of `directory` for rank 0, waiting (with one log line) while another run holds it.

    Every rank polls together, one short collective per look, so a long wait never reaches the collectives'
    timeout. Returns the lock on rank 0 (the caller releases it), None elsewhere.
    """
    told = False
    while True:
        lock = decide_on_main(ctx, lambda: try_lock_run(directory))
        holder = broadcast_object((lock_holder(directory) if lock is None else "") if ctx.is_main else None)
        if not holder:
            if lock is not None:
                _log_lock(lock)
            return lock
        if not told:
            get_logger().info(f"waiting for {what}: {directory} is locked by {holder}, which is producing it")
            told = True
        time.sleep(poll_s)


RANK_SEED_STREAM = -(1 << 40)  # an "epoch" no data stream uses: the per-rank seeds are unrelated to the data's


def seed_rank(seed: int, ctx: DistributedContext) -> None:
    """Under DDP, give each rank its own global RNG stream, drawn from (seed, rank), once the models exist.

    The networks are initialised from `seed` alike on every rank; afterwards dropout and drop-path masks must differ
    between ranks (each rank's samples get their own masks, as one process's samples do). A single process keeps the
    stream of `seed` unchanged.
    """
    if ctx.world_size == 1:
        return
    rank_seed = seed_for(seed, RANK_SEED_STREAM - ctx.rank)
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (BN running statistics) to every rank.

    DDP broadcasts buffers at the start of each training forward, so after the last step of an epoch every rank
    holds rank 0's statistics plus its own last update. Evaluation first makes all ranks evaluate rank 0's model,
    which is the one rank 0 checkpoints.
    """
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=src)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module

