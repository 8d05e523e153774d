"""Builders that turn a validated Config into the objects of a run: data, networks, teacher, distiller, optimizer."""
from __future__ import annotations

import contextlib
import difflib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ctkd import datasets, models
from ctkd.config import SYNC_BN_NEEDS_CUDA, Config, ConfigError, load_config
from ctkd.curricula import Curriculum, build_curriculum
from ctkd.datasets.loader import build_loader
from ctkd.distiller import Distiller, NetworkRuntime, build_distiller, measure_setup
from ctkd.distributed import DistributedContext, main_process_first, resolve_device
from ctkd.integrity import CheckpointError
from ctkd.methods import METHODS
from ctkd.models.fusion import fold_batchnorm
from ctkd.optim import StepLRSchedule, build_lr_schedule, build_sgd
from ctkd.system import tune_malloc
from ctkd.temperatures import LearnedTemperatureOptions, build_temperature
from ctkd.weights import load_weights_strict

_log = logging.getLogger("ctkd.build")  # a child of the project's logger: printed like the run's messages


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


IDENTIFY_LIMIT = 50  # library models built (on the meta device) at most when identifying a file's architecture


def identify_architectures(
    state: dict[str, torch.Tensor], num_classes: int, like: str | None = None, limit: int = IDENTIFY_LIMIT
) -> list[str]:
    """Models whose state_dict fits `state`: same keys and shapes, or else (say, when the file was trained for
    another number of classes) the same keys. Models are built on the meta device: no memory.

    The search stays in the family of `like`, the architecture the config names. For a zoo name (or None) that is
    every explicitly registered name (the CIFAR zoo and the paper's ImageNet names); for ``torchvision.X`` or
    ``timm.X``, that library's models named like X up to its first digit or underscore (resnet18 → resnet*), at
    most `limit` of them: the plain variants (resnet34, resnet50, ...) first, then the names closest to X.
    """
    same_keys, same_shapes = [], []
    for name in _family_candidates(like, limit):
        try:
            with torch.device("meta"):
                expected = models.build_model(name, num_classes=num_classes).state_dict()
        except (ValueError, TypeError, RuntimeError, NotImplementedError):
            continue  # a library model that cannot be built on meta or has no Linear head: not the file's
        if expected.keys() == state.keys():
            same_keys.append(name)
            if all(state[k].shape == v.shape for k, v in expected.items()):
                same_shapes.append(name)
    return same_shapes or same_keys


def _family_candidates(like: str | None, limit: int) -> list[str]:
    """The names `identify_architectures` tries for a config naming `like` (see there)."""
    explicit = models.MODELS.explicit_names()
    if like is None or like in explicit or models.library_model(like) is None:
        return explicit
    library, _, wanted = like.partition(".")
    family = re.match(r"[^\d_.]*", wanted).group() or wanted  # type: ignore[union-attr]  # always matches
    if library == "torchvision":
        import torchvision

        names = [n for n in torchvision.models.list_models(module=torchvision.models) if n.startswith(family)]
    else:
        import timm

        names = timm.list_models(f"{family}*")
    plain = re.compile(re.escape(family) + r"\d+")
    names = sorted(names, key=lambda n: (not plain.fullmatch(n), -difflib.SequenceMatcher(None, wanted, n).ratio()))
    return [f"{library}.{n}" for n in names[:limit]]


@contextlib.contextmanager
def _naming_keys(section: str) -> Iterator[None]:
    """Prefix a model's argument or pretrained-weights error with the config key of `section` that caused it."""
    try:
        yield
    except models.ModelArgumentError as err:
        raise models.ModelArgumentError(f"{section}.kwargs: {err}") from err
    except models.PretrainedWeightsError as err:
        raise models.PretrainedWeightsError(f"{section}.pretrained: {err}") from err


def _build_network(section: str, name: str, num_classes: int, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    """Build model `name` of config section `section` with its kwargs and, if `pretrained`, the library's weights."""
    with _naming_keys(section):
        models.check_arguments(name, kwargs, try_build=False)
        return models.build_model(name, num_classes=num_classes, pretrained=pretrained, **kwargs)


def load_teacher(cfg: Config, num_classes: int) -> nn.Module:
    """Build `cfg.teacher.name` with `teacher.kwargs` and load `cfg.teacher.checkpoint` strictly (to CPU first).

    Without a checkpoint (`teacher.pretrained`), the teacher is the library's pretrained model, whose classifier
    must have `num_classes` outputs: a teacher with a newly initialised classifier would teach nothing.
    """
    teacher_cfg = cfg.teacher
    assert teacher_cfg.name is not None  # guaranteed by config validation, as a checkpoint or pretrained is
    if teacher_cfg.checkpoint is None:
        with _naming_keys("teacher"):
            classes = models.pretrained_num_classes(teacher_cfg.name)
        if classes != num_classes:
            raise ConfigError(
                f"teacher.pretrained: the pretrained {teacher_cfg.name} classifies {classes} classes, but the "
                f"dataset ({cfg.data.name}) has {num_classes}; a teacher with a newly initialised classifier would "
                f"teach nothing. Give teacher.checkpoint=PATH, a {teacher_cfg.name} trained on this dataset"
            )
        return _build_network("teacher", teacher_cfg.name, num_classes, teacher_cfg.kwargs, pretrained=True)
    teacher = _build_network("teacher", teacher_cfg.name, num_classes, teacher_cfg.kwargs, pretrained=False)
    path = Path(teacher_cfg.checkpoint)
    if not path.is_file():
        raise CheckpointError(_missing_teacher_message(cfg))
    with _naming_file("teacher.checkpoint"):
        load_weights_strict(
            teacher, path, arch=teacher_cfg.name, key="teacher.name",
            identify=lambda state: identify_architectures(state, num_classes, like=teacher_cfg.name),
        )
    return teacher


@contextlib.contextmanager
def _naming_file(key: str) -> Iterator[None]:
    """Prefix an unreadable-file error with the config key that names the file."""
    try:
        yield
    except CheckpointError as err:
        if str(err).startswith("not a checkpoint"):
            raise CheckpointError(f"{key}: {err}") from err
        raise


def build_student(cfg: Config, num_classes: int) -> nn.Module:
    """Build `cfg.student.name` with `student.kwargs`, starting from the library's pretrained weights
    (`student.pretrained`; see models.build_model for a classifier of another size) or from the local file
    `student.weights` (loaded strictly; any layout ctkd.weights.extract_state_dict reads), else from scratch."""
    student_cfg = cfg.student
    student = _build_network(
        "student", student_cfg.name, num_classes, student_cfg.kwargs, pretrained=student_cfg.pretrained
    )
    if student_cfg.weights is not None:
        with _naming_file("student.weights"):
            load_weights_strict(
                student, student_cfg.weights, arch=student_cfg.name, key="student.name",
                identify=lambda state: identify_architectures(state, num_classes, like=student_cfg.name),
            )
    return student


def _missing_teacher_message(cfg: Config) -> str:
    """Why the teacher file is missing and how to get one (naming a shipped teacher config only if it exists)."""
    shipped = Path("configs/cifar100/teachers") / f"{cfg.teacher.name}.yaml"
    train = (
        f"train one with {shipped}" if shipped.is_file()
        else f"train one with a config of method vanilla and student.name={cfg.teacher.name} "
        f"(e.g. a copy of configs/quickstart_teacher.yaml)"
    )
    message = (
        f"teacher.checkpoint {cfg.teacher.checkpoint} does not exist. Download the teacher (e.g. the CRD/mdistiller "
        f"cifar_teachers.tar) or {train}, then pass teacher.checkpoint=PATH (or set teacher.train_config to that "
        f"config to train it automatically)"
    )
    if cfg.teacher.name is not None and models.library_model(cfg.teacher.name) is not None:
        message += (
            "; or, for a teacher with the library's own ImageNet weights (the paper's ImageNet teachers are "
            "torchvision's), set teacher.pretrained=true and teacher.checkpoint=null"
        )
    return message


def check_teacher_source(cfg: Config) -> None:
    """The teacher file exists, or `teacher.train_config` trains exactly the teacher and file the config names, or
    `teacher.pretrained` (without a checkpoint) takes the library's weights.

    Checked before anything runs, so a wrong path never trains (or resumes) some other teacher run first.
    """
    if not METHODS.get(cfg.method.name).uses_teacher:
        return
    if cfg.teacher.pretrained:
        if cfg.teacher.checkpoint is not None:
            raise ConfigError(
                f"teacher.pretrained is true and teacher.checkpoint is {cfg.teacher.checkpoint}: the teacher's "
                "weights come from one of them. Set teacher.checkpoint=null to use the library's pretrained "
                "weights, or teacher.pretrained=false to load the file"
            )
        return
    if Path(cfg.teacher.checkpoint).is_file():
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
    """Fail fast, before loading any data, on an unknown student or teacher name (with close matches), on
    `kwargs` the model does not take, on `pretrained` for a model without library weights and on a missing
    `student.weights` file."""
    sections = [("student", cfg.student)]
    if METHODS.get(cfg.method.name).uses_teacher and cfg.teacher.name is not None:
        sections.append(("teacher", cfg.teacher))
    for key, section in sections:
        assert section.name is not None  # the loop only holds named sections
        models.MODELS.get(section.name)
        with _naming_keys(key):
            models.check_arguments(section.name, section.kwargs)  # built on the meta device only if kwargs are set
            if section.pretrained:
                models.pretrained_num_classes(section.name)  # weights exist (nothing is downloaded here)
    check_student_weights(cfg)


def check_student_weights(cfg: Config) -> None:
    """`student.weights`, when set, is an existing file, and the student does not also start from `pretrained`."""
    weights = cfg.student.weights
    if weights is None:
        return
    if cfg.student.pretrained:
        raise ConfigError(
            f"student.pretrained is true and student.weights is {weights}: the student starts from one of them. "
            "Set student.pretrained=false to start from the file, or student.weights=null for the library's weights"
        )
    if not Path(weights).is_file():
        raise CheckpointError(
            f"student.weights {weights} does not exist (or is not a file): give the path of a weights file of "
            f"{cfg.student.name} (a state_dict, {{'model': ...}}, {{'state_dict': ...}} or a ctkd run checkpoint), "
            "or student.weights=null to start from a random initialisation"
        )


def check_inputs(cfg: Config) -> None:
    """Every fix-the-input error (names, teacher file, dataset files) before any file is written or run started."""
    check_model_names(cfg)
    if cfg.distributed.sync_bn and resolve_device(cfg.device).type != "cuda":
        raise ConfigError(SYNC_BN_NEEDS_CUDA)
    check_teacher_source(cfg)
    if not cfg.data.download:  # with download, missing files are fetched later (by rank 0)
        build_split(cfg, train=False)


def check_preact_features(cfg: Config, method: Any, student: nn.Module, teacher: nn.Module | None) -> None:
    """A method that distils pre-activation features needs networks that provide them; else an error naming both."""
    if not method.preact:
        return
    for section, name, net in (("student", cfg.student.name, student), ("teacher", cfg.teacher.name, teacher)):
        if net is not None and not getattr(net, "supports_preact", False):
            raise ConfigError(
                f"method {cfg.method.name} distils pre-activation features (before each stage's final ReLU), which "
                f"{section}.name {name} does not provide; use a model of the CIFAR zoo that does (resnet*, wrn_*, "
                "vgg*, MobileNetV2, ShuffleV1, ShuffleV2), or another method"
            )


def fold_teacher_batchnorm(teacher: nn.Module, image_shape: tuple[int, ...], preact: bool = False) -> int:
    """`runtime.fold_teacher_bn`: fold the frozen teacher's BatchNorms into its convolutions, checked through both
    entry points the methods call (logits, and features with logits); returns how many were folded."""
    teacher.eval()
    device = next(teacher.parameters()).device
    example = torch.randn(2, *image_shape, generator=torch.Generator().manual_seed(0)).to(device)
    entry_points = [lambda net, x: net(x)]
    if hasattr(teacher, "forward_with_features"):
        entry_points.append(lambda net, x: net.forward_with_features(x, preact=preact))
    folded = fold_batchnorm(teacher, example, entry_points)
    _log.info("teacher: %d BatchNorm layers folded into their convolutions (runtime.fold_teacher_bn)", folded)
    return folded


def build_networks(cfg: Config, train_set: datasets.DataSource, ctx: DistributedContext) -> Distiller:
    """Student, teacher (loaded strictly), temperature module and the method's heads and state."""
    num_classes = train_set.num_classes
    student = build_student(cfg, num_classes)
    method = METHODS.get(cfg.method.name)
    teacher, temperature = None, None
    if method.uses_teacher:
        teacher = load_teacher(cfg, num_classes)
        temperature = build_temperature(cfg.temperature, num_classes=num_classes)
    check_preact_features(cfg, method, student, teacher)
    setup = measure_setup(
        student, teacher, image_shape=train_set.image_shape, num_classes=num_classes,
        train_targets=train_set.targets, seed=cfg.seed, features=method.features, preact=method.preact,
    )
    distiller = build_distiller(
        cfg.method, student=student, teacher=teacher, temperature=temperature, loss=cfg.loss, setup=setup
    ).to(ctx.device)
    if teacher is not None and cfg.runtime.fold_teacher_bn:  # after the heads were built from the unfolded teacher
        fold_teacher_batchnorm(teacher, train_set.image_shape, preact=method.preact)
    if cfg.distributed.sync_bn and ctx.enabled:  # the teacher keeps plain BN: it only runs in eval mode
        # the whole trainable module: the student and the method's heads (SRRL's connector has BatchNorm too)
        distiller.trainable = nn.SyncBatchNorm.convert_sync_batchnorm(distiller.unwrapped)
    return distiller


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
            iterator = getattr(loader, "_iterator", None)  # DataLoader keeps its persistent-worker iterator here
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
            loader._iterator = None


def build_experiment(cfg: Config, ctx: DistributedContext) -> Experiment:
    """Names first, then data (a missing dataset fails before any model work), networks, distiller, optimizer.

    The trainable module is not wrapped in DDP here: a resumed run loads its state first (see `Distiller.wrap_ddp`).
    """
    check_model_names(cfg)
    if cfg.runtime.tune_malloc:
        tune_malloc()
    with main_process_first(ctx):  # rank 0 downloads, the others then read what it wrote
        train_set, test_set = build_split(cfg, train=True), build_split(cfg, train=False)
    train_loader = build_split_loader(cfg, train_set, train=True, ctx=ctx)
    test_loader = build_split_loader(cfg, test_set, train=False, ctx=ctx)
    distiller = build_networks(cfg, train_set, ctx)
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
    return Experiment(distiller, optimizer, schedule, curriculum, train_loader, test_loader, ctx, scaler)
