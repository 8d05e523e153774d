"""The model zoo: CIFAR architectures registered by name, checkpoint-compatible with CRD, mdistiller and CTKD.

Registered names (``list_models()``): resnet8, resnet14, resnet20, resnet32, resnet44, resnet56, resnet110,
resnet8x4, resnet32x4, wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2, vgg8, vgg11, vgg13, vgg16, vgg19 (all with BN),
MobileNetV2 (CIFAR "mobile_half": width 0.5, expansion 6), ShuffleV1, ShuffleV2, ResNet50 (the CIFAR one); the
paper's ImageNet models ResNet18, ResNet34, MobileNetV2_Imagenet, ShuffleV2_Imagenet (torchvision's, same state_dict)
and ResNet50_Imagenet (torchvision's resnet50).
Namespaces resolved on demand (``MODELS.names()`` shows them as placeholders): ``torchvision.<name>`` and
``timm.<name>`` build that library's model (models/imagenet.py).

Build one with ``build_model(name, num_classes=100, pretrained=False, **kwargs)``; an unknown name raises a
ValueError (UnknownNameError) that lists close matches, a keyword argument the model's builder does not take a
TypeError (ModelArgumentError) that lists those it takes, and ``pretrained=True`` for a model without library
weights (the CIFAR zoo) or offline a RuntimeError (PretrainedWeightsError) that says what to do instead.
Each model's ordered state_dict (keys, shapes, dtypes) equals the authors', so their teacher checkpoints load with
``strict=True``, and it computes the same function (checked against golden logits of the authors' models).

Interface of every model (``models.base.FeatureClassifier``):

* ``forward(x) -> Tensor``: logits of shape (B, num_classes), nothing else.
* ``forward_with_features(x, preact=False) -> (features, logits)``: ``features`` lists the stem output, each stage
  output and the globally pooled, flattened vector, in that order, so ``features[-1]`` is always the pooled vector
  (B, C) and ``features[-2]`` the last spatial map. The logits equal ``forward(x)``'s. With ``preact=True`` the
  stage outputs are taken before their final ReLU (the authors' definition per family: the last block's sum for
  ResNet/ShuffleNet, the stage before its ReLU for VGG, the following BN's output for WRN; MobileNetV2's stage
  outputs have no final ReLU, so they are unchanged). Models without such features (ResNet50) raise ValueError.
  In train mode every BatchNorm runs once per call, with or without ``preact`` (the authors' WRN re-applies three
  BNs when ``preact=True``, updating their running statistics twice;
  docs/differences.md).
* ``get_classifier() -> nn.Linear``: the final linear layer, i.e. ``get_classifier()(features[-1]) == logits``
  for every model (the authors' lookup via ``get_feat_modules()[-1]`` is wrong for several families;
  docs/differences.md, Classifier lookup).
"""
from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ctkd.errors import UserError
from ctkd.registry import import_submodules

from .base import MODELS, FeatureClassifier
from .pretrained import PAPER_IMAGENET, PretrainedWeightsError, library_model, pretrained_num_classes

import_submodules(__name__, __path__)  # the CIFAR zoo, the paper's ImageNet names and the library namespaces

__all__ = [
    "MODELS", "PAPER_IMAGENET", "FeatureClassifier", "ModelArgumentError", "PretrainedWeightsError", "build_model",
    "check_arguments", "library_model", "list_models", "model_arguments", "pretrained_num_classes",
]

# Keyword arguments that are options of their own, never a builder's extra keyword arguments.
_RESERVED = {
    "num_classes": "the number of classes comes from the dataset",
    "pretrained": "it is an option of its own (pretrained: true beside kwargs)",
    "weights": "library weights come with pretrained: true, a local file with student.weights / teacher.checkpoint",
}


class ModelArgumentError(UserError, TypeError):
    """A keyword argument that the model's builder does not take."""


def build_model(name: str, num_classes: int = 100, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build the registered model `name` with `num_classes` outputs, passing `kwargs` to its builder.

    `pretrained`: start from the library's own weights (torchvision./timm. models and the paper's ImageNet names;
    see models.imagenet.build_torchvision / build_timm, also for a `num_classes` other than the weights').
    Unknown names raise UnknownNameError, arguments the builder does not take ModelArgumentError, and pretrained
    weights that do not exist or cannot be downloaded PretrainedWeightsError (all ValueError/TypeError/RuntimeError).
    """
    builder = MODELS.get(name)
    if pretrained:
        pretrained_num_classes(name)  # the CIFAR zoo and some timm models have no library weights: say so first
    try:
        return builder(num_classes=num_classes, **({"pretrained": True} if pretrained else {}), **kwargs)
    except TypeError as err:
        rejected = _rejected_argument(err, kwargs)
        if rejected is None:
            raise
        raise ModelArgumentError(_argument_message(name, rejected)) from err


def check_arguments(name: str, kwargs: Mapping[str, Any], *, try_build: bool = True) -> None:
    """Raise ModelArgumentError if `kwargs` holds an option of its own (num_classes, pretrained, weights) or, with
    `try_build`, an argument the builder of `name` rejects: it is built on the meta device (no memory, no weights)."""
    for key in kwargs:
        if key in _RESERVED:
            raise ModelArgumentError(f"'{key}' is not an extra keyword argument of model '{name}': {_RESERVED[key]}")
    if not (try_build and kwargs):
        return
    try:
        with torch.device("meta"):
            build_model(name, num_classes=10, **kwargs)
    except ModelArgumentError:
        raise
    except Exception:  # noqa: BLE001 - not an argument error: the real build reports it, on the real device
        return


def model_arguments(name: str) -> list[str] | None:
    """The extra keyword arguments model `name` takes, where they can be read off signatures (None otherwise):
    those of its builder, or for torchvision/timm models those of the model class with a default value."""
    found = library_model(name)
    if found is None:
        params = inspect.signature(MODELS.get(name)).parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
    else:
        cls = _library_class(*found)
        if cls is None:
            return None
        params = [p for p in inspect.signature(cls).parameters.values() if p.default is not p.empty]
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in keyword and p.name not in _RESERVED]


def _library_class(library: str, name: str) -> type | None:
    """The model class a torchvision/timm builder returns (its return annotation), if it says."""
    try:
        if library == "torchvision":
            import torchvision

            builder = torchvision.models.get_model_builder(name)
        else:
            import timm

            builder = timm.models.model_entrypoint(timm.models.split_model_name_tag(name)[0])
        cls = typing.get_type_hints(builder).get("return")
    except Exception:  # noqa: BLE001 - introspection for an error message only: without it, the message is shorter
        return None
    return cls if isinstance(cls, type) else None


def _rejected_argument(err: TypeError, kwargs: Mapping[str, Any]) -> str | None:
    """The key of `kwargs` that a builder's TypeError complains about ("unexpected keyword argument 'x'",
    "got multiple values for argument 'x'"), or None when the TypeError is about something else."""
    for match in re.finditer(r"argument '(\w+)'", str(err)):
        if match.group(1) in kwargs:
            return match.group(1)
    return None


def _argument_message(name: str, rejected: str) -> str:
    """Why `rejected` cannot be passed to model `name`, with the arguments it does take where they are known."""
    accepted = model_arguments(name)
    if accepted is None:
        takes = ""
    elif accepted:
        takes = f"; it takes: {', '.join(accepted)}"
    else:
        takes = "; it takes no keyword arguments besides num_classes"
    return f"model '{name}' does not take the keyword argument '{rejected}'{takes}"


def list_models() -> list[str]:
    """All explicitly registered model names, sorted (not the torchvision./timm. namespaces: thousands of models)."""
    return MODELS.explicit_names()
