"""Process-group set-up for torchrun (single node, multi-node, SLURM) and the collectives the trainer needs.

One process per device. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them the run is a single process and
every helper here is a no-op, so the same code path serves 1 and N processes.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor, nn

from ctkd.config import ConfigError
from datasets.loader import shard_sizes


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


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s value of `obj` on every rank (pickled; for small decisions such as a resume path)."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


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


FAULT_ENV = "CTKD_INJECT_FAULT"


def inject_fault_if_requested(rank: int, epoch: int) -> None:
    """Testing hook for failure handling: with CTKD_INJECT_FAULT="RANK:EPOCH:raise|kill", that rank raises (or
    SIGKILLs itself) when that epoch starts. Unset in normal use."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    fault_rank, fault_epoch, kind = spec.split(":")
    if int(fault_rank) != rank or int(fault_epoch) != epoch:
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"fault injected by {FAULT_ENV}={spec}")
