"""Builders that turn a validated Config into the objects of a run: data splits and loaders, and the Experiment
(networks from ctkd.networks, optimizer, LR schedule, curriculum)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from ctkd import datasets
from ctkd.config import SYNC_BN_NEEDS_CUDA, Config, ConfigError
from ctkd.curricula import Curriculum, build_curriculum
from ctkd.datasets.loader import build_loader
from ctkd.distiller import Distiller, NetworkRuntime
from ctkd.distributed import DistributedContext, main_process_first, resolve_device
from ctkd.methods import METHODS
from ctkd.networks import build_networks, check_model_names, check_teacher_source
from ctkd.optim import StepLRSchedule, build_lr_schedule, build_sgd
from ctkd.system import tune_malloc
from ctkd.temperatures import LearnedTemperatureOptions


def build_split(cfg: Config, *, train: bool) -> datasets.DataSource:
    """The train or test split named by `cfg.data` (validated on load: a missing dataset fails here).

    Folder datasets list their files here but decode no image (that happens in the loader's workers).
    """
    data = cfg.data
    return datasets.build_dataset(
        data.name, root=data.root, train=train, download=data.download, **data.dataset_options()
    )


def batches_in_process(cfg: Config, dataset: datasets.DataSource, device: torch.device) -> bool:
    """Whether batches are made in the training process, on its device, instead of in loader workers
    (`runtime.data_on_device`): in-memory datasets only (an image folder decodes its files in workers)."""
    movable = isinstance(dataset, datasets.ImageDataset)
    setting = cfg.runtime.data_on_device
    if setting == "on" and not movable:
        raise ConfigError(
            f"runtime.data_on_device=on needs an in-memory dataset (cifar100, synthetic); data.name "
            f"{cfg.data.name} decodes its files in loader workers: set runtime.data_on_device=auto or off"
        )
    # auto: always for an in-memory split. On a GPU the split lives there; on a CPU a batch's crop, flip and
    # normalisation take ~1 ms in this process, while worker processes would take cores from the step
    # (docs/benchmarks.md: resnet56 → resnet20 on 2 cores, 204 → 225 images/s)
    return movable and setting in ("on", "auto")


def build_split_loader(
    cfg: Config, dataset: datasets.DataSource, *, train: bool, ctx: DistributedContext
) -> DataLoader:
    """Train loader (shuffled, augmented as a function of (seed, epoch, index)) or test loader (in order, half batch).

    Batch sizes are global: each rank takes its share of every batch, so N processes see the same batches as one.
    With `runtime.data_on_device` an in-memory split moves to the device and is augmented there in batches, in this
    process (no workers, no pinned copies): the same pixels as the CPU path.
    """
    key, batch_size = ("data.batch_size", cfg.data.batch_size) if train else (
        "data.test_batch_size", cfg.data.effective_test_batch_size)
    if batch_size % ctx.world_size:
        raise ConfigError(
            f"{key} = {batch_size} is the global batch and must be divisible by the number of processes "
            f"({ctx.world_size}); choose a multiple of {ctx.world_size}"
        )
    leftover = len(dataset) % batch_size
    # every rank needs a sample of every batch, and a method with BatchNorm in its heads (SRRL) needs two
    need = ctx.world_size * METHODS.get(cfg.method.name).min_samples_per_rank
    if train and batch_size < need:
        raise ConfigError(
            f"data.batch_size = {batch_size} gives each of the {ctx.world_size} processes fewer than the "
            f"{need // ctx.world_size} samples per batch that method {cfg.method.name} needs; use at least {need}"
        )
    if train and 0 < leftover < need:
        raise ConfigError(
            f"the last training batch has {leftover} samples, fewer than the {need} that {ctx.world_size} "
            f"process(es) of method {cfg.method.name} need; choose a data.batch_size for which "
            f"{len(dataset)} % batch_size is 0 or ≥ {need}"
        )
    in_process = batches_in_process(cfg, dataset, ctx.device)
    if in_process:
        dataset = dataset.to(ctx.device)  # type: ignore[attr-defined]  (an ImageDataset: checked above)
    return build_loader(
        dataset,
        batch_size=batch_size,
        train=train,
        seed=cfg.seed,
        num_workers=0 if in_process else cfg.data.num_workers,
        rank=ctx.rank,
        world_size=ctx.world_size,
        pin_memory=ctx.device.type == "cuda" and not in_process,
        persistent_workers=True,  # batches are pure functions of their key: no reason to re-fork workers per epoch
    )


def check_inputs(cfg: Config) -> None:
    """Every fix-the-input error (names, teacher file, dataset files) before any file is written or run started."""
    check_model_names(cfg)
    if cfg.distributed.sync_bn and resolve_device(cfg.device).type != "cuda":
        raise ConfigError(SYNC_BN_NEEDS_CUDA)
    check_teacher_source(cfg)
    if not cfg.data.download:  # with download, missing files are fetched later (by rank 0)
        build_split(cfg, train=False)


@dataclass
class Experiment:
    """Everything a training run manipulates."""

    distiller: Distiller
    optimizer: torch.optim.SGD
    schedule: StepLRSchedule  # epoch-based step LR, and the per-iteration warm-up/cosine multiplier if any
    curriculum: Curriculum
    train_loader: DataLoader
    test_loader: DataLoader
    ctx: DistributedContext
    scaler: torch.amp.GradScaler | None = None  # runtime.amp: fp16 only

    @property
    def device(self) -> torch.device:
        """This process's device."""
        return self.ctx.device

    def close(self) -> None:
        """Stop the loaders' persistent worker processes now, rather than whenever the loaders are collected.

        An exception's traceback (Ctrl-C, a failed test) can keep a loader alive until interpreter exit, where its
        workers and multiprocessing's resource tracker then wait on each other forever.
        """
        for loader in (self.train_loader, self.test_loader):
            close_loader(loader)


def close_loader(loader: DataLoader) -> None:
    """Stop the loader's persistent worker processes now (see Experiment.close)."""
    iterator = getattr(loader, "_iterator", None)  # DataLoader keeps its persistent-worker iterator here
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


@dataclass(frozen=True)
class RunData:
    """A run's train and test splits and their loaders: built once, and shared by the members of a cohort
    (ctkd.cohort), whose batches are the same pure functions of (seed, epoch, index)."""

    train_set: datasets.DataSource
    test_set: datasets.DataSource
    train_loader: DataLoader
    test_loader: DataLoader


def build_data(cfg: Config, ctx: DistributedContext) -> RunData:
    """The splits named by `cfg.data` and their loaders (rank 0 downloads first)."""
    with main_process_first(ctx):  # rank 0 downloads, the others then read what it wrote
        train_set, test_set = build_split(cfg, train=True), build_split(cfg, train=False)
    train_loader = build_split_loader(cfg, train_set, train=True, ctx=ctx)
    test_loader = build_split_loader(cfg, test_set, train=False, ctx=ctx)
    return RunData(train_set, test_set, train_loader, test_loader)


def build_experiment(cfg: Config, ctx: DistributedContext, data: RunData | None = None) -> Experiment:
    """Data (`data`: already built, e.g. a cohort's), networks, distiller, optimizer (a run checks its inputs
    first: `check_inputs`).

    The trainable module is not wrapped in DDP here: a resumed run loads its state first (see `Distiller.wrap_ddp`).
    """
    if cfg.runtime.tune_malloc:
        tune_malloc()
    data = data or build_data(cfg, ctx)
    train_loader = data.train_loader
    distiller = build_networks(cfg, data.train_set, ctx)
    distiller.set_runtime(NetworkRuntime.from_config(ctx.device.type, cfg.runtime.amp, cfg.runtime.channels_last))
    learned = cfg.temperature if isinstance(cfg.temperature, LearnedTemperatureOptions) else None
    optimizer = build_sgd(
        distiller.unwrapped, lr=cfg.optimizer.lr, momentum=cfg.optimizer.momentum,
        weight_decay=cfg.optimizer.weight_decay, temperature_lr=learned.lr if learned else None,
        temperature_weight_decay=learned.weight_decay if learned else None, implementation=cfg.runtime.sgd,
    )
    schedule = build_lr_schedule(optimizer, cfg.optimizer, steps_per_epoch=len(train_loader), epochs=cfg.epochs)
    scaler = torch.amp.GradScaler(ctx.device.type) if cfg.runtime.amp == "fp16" else None
    curriculum = build_curriculum(cfg.curriculum)
    return Experiment(distiller, optimizer, schedule, curriculum, train_loader, data.test_loader, ctx, scaler)
