"""The model zoo: CIFAR architectures registered by name, checkpoint-compatible with CRD, mdistiller and CTKD.

Registered names (``list_models()``): resnet8, resnet14, resnet20, resnet32, resnet44, resnet56, resnet110,
resnet8x4, resnet32x4, wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2, vgg8, vgg11, vgg13, vgg16, vgg19 (all with BN),
MobileNetV2 (CIFAR "mobile_half": width 0.5, expansion 6), ShuffleV1, ShuffleV2, ResNet50 (the CIFAR one); the
paper's ImageNet models ResNet18, ResNet34, MobileNetV2_Imagenet, ShuffleV2_Imagenet (torchvision's, same state_dict).
Namespaces resolved on demand (``MODELS.names()`` shows them as placeholders): ``torchvision.<name>`` and
``timm.<name>`` build that library's model (models/imagenet.py).

Build one with ``build_model(name, num_classes=100)``; an unknown name raises a ValueError (UnknownNameError) that
lists close matches.
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

from typing import Any

from torch import nn

from models import cifar, imagenet  # noqa: F401  (importing registers the architectures)
from models.base import MODELS, FeatureClassifier

__all__ = ["MODELS", "FeatureClassifier", "build_model", "list_models"]


def build_model(name: str, num_classes: int = 100, **kwargs: Any) -> nn.Module:
    """Build the registered model `name` with `num_classes` outputs; unknown names raise ValueError."""
    return MODELS.build(name, num_classes=num_classes, **kwargs)


def list_models() -> list[str]:
    """All explicitly registered model names, sorted (not the torchvision./timm. namespaces: thousands of models)."""
    return MODELS.explicit_names()
