"""Builders that turn a validated Config into the objects of a run: data, networks, teacher, distiller, optimizer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import datasets
import models
from ctkd.checkpoint import CheckpointError, load_weights_strict
from ctkd.config import SYNC_BN_NEEDS_CUDA, Config, ConfigError, load_config
from ctkd.curriculum import Curriculum, build_curriculum
from ctkd.distiller import Distiller, build_distiller, measure_setup
from ctkd.distributed import DistributedContext, main_process_first, resolve_device
from ctkd.methods import METHODS
from ctkd.optim import StepLRSchedule, build_sgd
from ctkd.temperature import build_temperature
from datasets.loader import build_loader


def build_split(cfg: Config, *, train: bool) -> datasets.ImageDataset:
    """The train or test split named by `cfg.data` (validated on load: a missing dataset fails here)."""
    data = cfg.data
    return datasets.build_dataset(
        data.name, root=data.root, train=train, download=data.download, **data.dataset_options()
    )


def build_split_loader(
    cfg: Config, dataset: datasets.ImageDataset, *, train: bool, ctx: DistributedContext
) -> DataLoader:
    """Train loader (shuffled, augmented as a function of (seed, epoch, index)) or test loader (in order, half batch).

    Batch sizes are global: each rank takes its share of every batch, so N processes see the same batches as one.
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
    return build_loader(
        dataset,
        batch_size=batch_size,
        train=train,
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        rank=ctx.rank,
        world_size=ctx.world_size,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=True,  # batches are pure functions of their key: no reason to re-fork workers per epoch
    )


def identify_architectures(state: dict[str, torch.Tensor], num_classes: int) -> list[str]:
    """Registered models whose state_dict fits `state`: same keys and shapes, or else (say, when the file was
    trained for another number of classes) the same keys. Models are built on the meta device: no memory.

    Only the explicitly registered names are tried: the torchvision./timm. namespaces hold too many models to build.
    """
    same_keys, same_shapes = [], []
    for name in models.MODELS.explicit_names():
        with torch.device("meta"):
            expected = models.build_model(name, num_classes=num_classes).state_dict()
        if expected.keys() == state.keys():
            same_keys.append(name)
            if all(state[k].shape == v.shape for k, v in expected.items()):
                same_shapes.append(name)
    return same_shapes or same_keys


def load_teacher(cfg: Config, num_classes: int) -> nn.Module:
    """Build `cfg.teacher.name` and load `cfg.teacher.checkpoint` strictly (to CPU first)."""
    assert cfg.teacher.name is not None and cfg.teacher.checkpoint is not None  # guaranteed by config validation
    teacher = models.build_model(cfg.teacher.name, num_classes=num_classes)
    path = Path(cfg.teacher.checkpoint)
    if not path.is_file():
        raise CheckpointError(_missing_teacher_message(cfg))
    load_weights_strict(
        teacher, path, arch=cfg.teacher.name, key="teacher.name",
        identify=lambda state: identify_architectures(state, num_classes),
    )
    return teacher


def _missing_teacher_message(cfg: Config) -> str:
    """Why the teacher file is missing and how to get one (naming a shipped teacher config only if it exists)."""
    shipped = Path("configs/cifar100/teachers") / f"{cfg.teacher.name}.yaml"
    train = (
        f"train one with {shipped}" if shipped.is_file()
        else f"train one with a config of method vanilla and student.name={cfg.teacher.name} "
        f"(e.g. a copy of configs/quickstart_teacher.yaml)"
    )
    return (
        f"teacher.checkpoint {cfg.teacher.checkpoint} does not exist. Download the teacher (e.g. the CRD/mdistiller "
        f"cifar_teachers.tar) or {train}, then pass teacher.checkpoint=PATH (or set teacher.train_config to that "
        f"config to train it automatically)"
    )


def check_teacher_source(cfg: Config) -> None:
    """The teacher file exists, or `teacher.train_config` trains exactly the teacher and file the config names.

    Checked before anything runs, so a wrong path never trains (or resumes) some other teacher run first.
    """
    if not METHODS.get(cfg.method.name).uses_teacher or Path(cfg.teacher.checkpoint).is_file():
        return
    if cfg.teacher.train_config is None:
        raise CheckpointError(_missing_teacher_message(cfg))
    teacher_cfg = load_config(cfg.teacher.train_config)
    produced = Path(teacher_cfg.output_dir)
    wanted = Path(cfg.teacher.checkpoint)
    if wanted.resolve().parent != produced.resolve() or wanted.name not in ("best.pth", "last.pth"):
        raise ConfigError(
            f"teacher.checkpoint {wanted} does not exist, and teacher.train_config {cfg.teacher.train_config} "
            f"would not produce it (it writes {produced / 'best.pth'}). Set teacher.checkpoint="
            f"{produced / 'best.pth'} to train and use that teacher, or point teacher.checkpoint at an existing "
            f"file and set teacher.train_config=null"
        )
    if teacher_cfg.student.name != cfg.teacher.name:
        raise ConfigError(
            f"teacher.train_config {cfg.teacher.train_config} trains {teacher_cfg.student.name}, but teacher.name "
            f"is {cfg.teacher.name}; make them name the same architecture"
        )


def check_model_names(cfg: Config) -> None:
    """Fail fast on an unknown student or teacher name (with close matches), before loading any data."""
    models.MODELS.get(cfg.student.name)
    if METHODS.get(cfg.method.name).uses_teacher and cfg.teacher.name is not None:
        models.MODELS.get(cfg.teacher.name)


def check_inputs(cfg: Config) -> None:
    """Every fix-the-input error (names, teacher file, dataset files) before any file is written or run started."""
    check_model_names(cfg)
    if cfg.distributed.sync_bn and resolve_device(cfg.device).type != "cuda":
        raise ConfigError(SYNC_BN_NEEDS_CUDA)
    check_teacher_source(cfg)
    if not cfg.data.download:  # with download, missing files are fetched later (by rank 0)
        build_split(cfg, train=False)


def build_networks(cfg: Config, train_set: datasets.ImageDataset, ctx: DistributedContext) -> Distiller:
    """Student, teacher (loaded strictly), temperature module and the method's heads and state."""
    num_classes = train_set.num_classes
    student = models.build_model(cfg.student.name, num_classes=num_classes)
    method = METHODS.get(cfg.method.name)
    teacher, temperature = None, None
    if method.uses_teacher:
        teacher = load_teacher(cfg, num_classes)
        temperature = build_temperature(cfg.temperature, num_classes=num_classes)
    setup = measure_setup(
        student, teacher, image_shape=tuple(train_set.images.shape[1:]), num_classes=num_classes,
        train_targets=train_set.targets, seed=cfg.seed, features=method.features,
    )
    distiller = build_distiller(
        cfg.method, student=student, teacher=teacher, temperature=temperature, loss=cfg.loss, setup=setup
    ).to(ctx.device)
    if cfg.distributed.sync_bn and ctx.enabled:  # the teacher keeps plain BN: it only runs in eval mode
        # the whole trainable module: the student and the method's heads (SRRL's connector has BatchNorm too)
        distiller.trainable = nn.SyncBatchNorm.convert_sync_batchnorm(distiller.unwrapped)
    return distiller


@dataclass
class Experiment:
    """Everything a training run manipulates."""

    distiller: Distiller
    optimizer: torch.optim.SGD
    schedule: StepLRSchedule
    curriculum: Curriculum
    train_loader: DataLoader
    test_loader: DataLoader
    ctx: DistributedContext

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
            iterator = getattr(loader, "_iterator", None)  # DataLoader keeps its persistent-worker iterator here
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
            loader._iterator = None


def build_experiment(cfg: Config, ctx: DistributedContext) -> Experiment:
    """Names first, then data (a missing dataset fails before any model work), networks, distiller, optimizer.

    The trainable module is not wrapped in DDP here: a resumed run loads its state first (see `Distiller.wrap_ddp`).
    """
    check_model_names(cfg)
    with main_process_first(ctx):  # rank 0 downloads, the others then read what it wrote
        train_set, test_set = build_split(cfg, train=True), build_split(cfg, train=False)
    train_loader = build_split_loader(cfg, train_set, train=True, ctx=ctx)
    test_loader = build_split_loader(cfg, test_set, train=False, ctx=ctx)
    distiller = build_networks(cfg, train_set, ctx)
    optimizer = build_sgd(
        distiller.unwrapped, lr=cfg.optimizer.lr, momentum=cfg.optimizer.momentum,
        weight_decay=cfg.optimizer.weight_decay, temperature_lr=cfg.temperature.lr,
        temperature_weight_decay=cfg.temperature.weight_decay,
    )
    schedule = StepLRSchedule(optimizer, cfg.optimizer.lr_decay_epochs, cfg.optimizer.lr_decay_rate)
    c = cfg.curriculum
    curriculum = build_curriculum(c.name, lambda_min=c.lambda_min, lambda_max=c.lambda_max, loops=c.loops)
    return Experiment(distiller, optimizer, schedule, curriculum, train_loader, test_loader, ctx)
