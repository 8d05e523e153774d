"""The networks of a run: student and teacher from the zoo (their files loaded strictly, named by config key in
every error), the checks that run before any data is loaded, and the distiller that joins them."""
from __future__ import annotations

import contextlib
import difflib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctkd import datasets, models
from ctkd.config import Config, ConfigError, load_config
from ctkd.distiller import Distiller, build_distiller, measure_setup
from ctkd.distributed import DistributedContext
from ctkd.integrity import CheckpointError
from ctkd.methods import METHODS
from ctkd.models.fusion import fold_batchnorm
from ctkd.temperatures import build_temperature
from ctkd.weights import load_weights_strict

_log = logging.getLogger("ctkd.networks")  # a child of the project's logger: printed like the run's messages


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


def check_preact_features(cfg: Config, method: Any, student: nn.Module, teacher: nn.Module | None) -> None:
    """A method that distils pre-activation features needs networks that provide them; else an error naming both."""
    for section, name, net in (("student", cfg.student.name, student), ("teacher", cfg.teacher.name, teacher)):
        if method.preact_of(section) and net is not None and not getattr(net, "supports_preact", False):
            raise ConfigError(
                f"method {cfg.method.name} distils pre-activation features (before each stage's final ReLU), which "
                f"{section}.name {name} does not provide; use a model of the CIFAR zoo (every one does: resnet*, "
                "wrn_*, vgg*, MobileNetV2, ShuffleV1, ShuffleV2, ResNet50), or another method"
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
        teacher_preact=method.preact_of("teacher"),
    )
    distiller = build_distiller(
        cfg.method, student=student, teacher=teacher, temperature=temperature, loss=cfg.loss, setup=setup
    ).to(ctx.device)
    if teacher is not None and cfg.runtime.fold_teacher_bn:  # after the heads were built from the unfolded teacher
        fold_teacher_batchnorm(teacher, train_set.image_shape, preact=method.preact_of("teacher"))
    if cfg.distributed.sync_bn and ctx.enabled:  # the teacher keeps plain BN: it only runs in eval mode
        # the whole trainable module: the student and the method's heads (SRRL's connector has BatchNorm too)
        distiller.trainable = nn.SyncBatchNorm.convert_sync_batchnorm(distiller.unwrapped)
    return distiller
