"""The library pretrained weights behind the zoo's torchvision/timm names: which exist, how many classes they have,
and one-line errors (naming the cache and the local alternatives) when they cannot be had."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ctkd.errors import UserError

from .base import MODELS

# The paper's ImageNet names → the torchvision model each is (same state_dict keys, shapes and function).
PAPER_IMAGENET: dict[str, str] = {
    "ResNet18": "resnet18",
    "ResNet34": "resnet34",
    "ResNet50_Imagenet": "resnet50",
    "MobileNetV2_Imagenet": "mobilenet_v2",
    "ShuffleV2_Imagenet": "shufflenet_v2_x1_0",
}


# Where to get weights instead of the library's, named in every pretrained-weights error.
_LOCAL_ALTERNATIVES = (
    "or start from a local weights file instead (pretrained: false with student.weights: PATH for a student, "
    "teacher.checkpoint: PATH for a teacher)"
)


class PretrainedWeightsError(UserError, RuntimeError):
    """Library pretrained weights that do not exist for a model, cannot be downloaded, or do not fit it."""


def library_model(name: str) -> tuple[str, str] | None:
    """(library, the library's model name) behind zoo name `name`, e.g. ('torchvision', 'resnet18') for ResNet18
    and torchvision.resnet18, ('timm', 'resnet18') for timm.resnet18; None for the CIFAR zoo (no library model)."""
    if name in PAPER_IMAGENET:
        return "torchvision", PAPER_IMAGENET[name]
    for library in ("torchvision", "timm"):
        if name.startswith(f"{library}."):
            return library, name[len(library) + 1:]
    return None


def pretrained_num_classes(name: str) -> int:
    """The number of classes of the library pretrained weights of zoo model `name` (1000 for ImageNet-1k), found
    without downloading anything; PretrainedWeightsError if the model has none (the CIFAR zoo, some timm models)."""
    MODELS.get(name)  # an unknown name is an UnknownNameError with close matches
    found = library_model(name)
    if found is None:
        paper = ", ".join(PAPER_IMAGENET)
        raise PretrainedWeightsError(
            f"model '{name}' has no library pretrained weights: pretrained works for torchvision.<name>, "
            f"timm.<name> and the paper's ImageNet names ({paper}); {_LOCAL_ALTERNATIVES}"
        )
    library, library_name = found
    if library == "torchvision":
        return len(torchvision_weights(library_name).meta["categories"])
    return int(timm_pretrained_cfg(library_name).num_classes)


def torchvision_weights(name: str) -> Any:
    """The DEFAULT weights enum member of torchvision model `name`."""
    import torchvision

    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError) as err:
        raise PretrainedWeightsError(
            f"torchvision has no pretrained weights for torchvision.{name} ({err}); {_LOCAL_ALTERNATIVES}"
        ) from err


def timm_pretrained_cfg(name: str) -> Any:
    """timm's pretrained config of `name` (its default tag unless the name has one), which must name weights."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict):
        raise PretrainedWeightsError(
            f"timm has no pretrained weights for timm.{name} (timm.list_models(pretrained=True) lists the models "
            f"that have them); {_LOCAL_ALTERNATIVES}"
        )
    return cfg


def hub_checkpoints() -> str:
    """torch's hub cache of downloaded weights (torchvision's, and timm's URL weights)."""
    import torch.hub

    return str(Path(torch.hub.get_dir()) / "checkpoints")


@contextlib.contextmanager
def pretrained_failures(label: str, source: str, cache: str, filename: str | None, hint: str = "") -> Iterator[None]:
    """Turn a failed download (offline: URLError, huggingface_hub's LocalEntryNotFoundError, both OSErrors) or
    weights that do not fit the model built with the given kwargs into a one-line PretrainedWeightsError."""
    try:
        yield
    except OSError as err:
        copy = f"copy {filename} there, " if filename else ""
        raise PretrainedWeightsError(
            f"cannot get the pretrained weights of {label}: {type(err).__name__}: {_one_line(err).rstrip('.')}. "
            f"The library downloads them from {source} once into its cache, {cache}{hint}, and reads them from "
            f"there afterwards: connect to the internet once, {copy}{_LOCAL_ALTERNATIVES}"
        ) from err
    except RuntimeError as err:
        if "loading state_dict" not in str(err):
            raise
        raise PretrainedWeightsError(
            f"the pretrained weights of {label} do not fit the model built with these keyword arguments: "
            f"{_one_line(err)[:600]}. Drop the arguments that change the architecture, "
            f"{_LOCAL_ALTERNATIVES.removeprefix('or ')}"
        ) from err


def _one_line(err: BaseException) -> str:
    """An exception's message on one line (torch's state_dict errors span several)."""
    return " ".join(str(err).split())


def head_reinitialised(label: str, classifier: Any, pretrained_classes: int, num_classes: int) -> str:
    """The warning that a pretrained model's classifier was not loaded."""
    return (
        f"{label}: loaded the library's pretrained weights except the classifier {classifier}, made for "
        f"{pretrained_classes} classes: this model has {num_classes}, so its classifier is newly initialised"
    )
