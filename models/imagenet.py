"""Models of torchvision and timm behind the zoo interface, with their state_dicts left exactly as the library's.

Names: ``torchvision.<name>`` (any classification model of ``torchvision.models.list_models()``), ``timm.<name>``
(any model of ``timm.list_models()``), and the paper's ImageNet names ResNet18, ResNet34, MobileNetV2_Imagenet and
ShuffleV2_Imagenet (torchvision's resnet18, resnet34, mobilenet_v2 and shufflenet_v2_x1_0), whose state_dicts equal
the authors' ImageNet models', so a bare torchvision state_dict loads strictly; ResNet50_Imagenet is torchvision's
resnet50 (the name ResNet50 is the CIFAR model's).

``pretrained=True`` starts these models from their library's own ImageNet weights (torchvision: the DEFAULT weights
of ``torchvision.models.get_model_weights``; timm: ``pretrained=True``), downloaded once into the library's cache;
see `build_torchvision` and `build_timm` for a classifier of another size, and `PretrainedWeightsError` for offline.

The library model is not wrapped (a wrapper would prefix every state_dict key): its class is swapped for a subclass
that mixes in `LibraryClassifier`. Features come from forward hooks on the stage modules (one mechanism for both
libraries): timm names them in ``feature_info``, torchvision's are listed per family in `_TORCHVISION_TAPS`, and any
other model taps the children of its trunk and keeps the last map of each spatial resolution.
"""
from __future__ import annotations

import difflib
import functools
import logging
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from ctkd.errors import UserError
from ctkd.registry import UnknownNameError

from .base import MODELS, FeatureClassifier
from .pretrained import (
    head_reinitialised,
    hub_checkpoints,
    pretrained_failures,
    timm_pretrained_cfg,
    torchvision_weights,
)

__all__ = ["LibraryClassifier", "adapt", "build_timm", "build_torchvision"]

_log = logging.getLogger("ctkd.models")  # a child of the project's logger: printed like the run's messages

# Stem output then each stage output, per torchvision class: the layers the authors' ImageNet models return
# (tests/data/zoo.json "feat_shapes"); MobileNetV2's 64-channel stage is not among them in their code either.
_TORCHVISION_TAPS: dict[str, tuple[str, ...]] = {
    "ResNet": ("maxpool", "layer1", "layer2", "layer3", "layer4"),
    "MobileNetV2": ("features.0", "features.3", "features.6", "features.13", "features.17"),
    "ShuffleNetV2": ("maxpool", "stage2", "stage3", "stage4"),
}


class NoLinearClassifierError(UserError, ValueError):
    """The library model has no final nn.Linear, which the zoo interface (and the logit-based methods) need."""


class LibraryClassifier(FeatureClassifier):
    """Mixed into a torchvision/timm model's own class: the zoo interface, computed with forward hooks."""

    supports_preact: ClassVar[bool] = False
    # The library's own class, whose forward computes the logits (set on each adapted subclass).
    _library_cls: ClassVar[type[nn.Module]]
    _zoo_taps: tuple[str, ...]
    _zoo_by_resolution: bool
    _zoo_pooled_from: tuple[str, ...]
    _zoo_classifier: str

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape (B, num_classes), computed by the library's forward."""
        return self._library_cls.forward(self, x)

    def _forward_features(self, x: Tensor, preact: bool) -> tuple[list[Tensor], Tensor]:
        """One library forward, with hooks collecting the tapped maps and the head's (pooled) input."""
        maps: list[Tensor] = []
        pooled: list[Tensor] = []

        def keep_output(_module: nn.Module, _args: Any, output: Any) -> None:
            maps.append(output)

        def keep_input(_module: nn.Module, args: tuple[Any, ...]) -> None:
            # The first 2-D input wins: a head that pools itself (timm's ClassifierHead) gets a map, and then the
            # classifier's input, which comes later, is the pooled vector.
            if isinstance(args[0], Tensor) and args[0].dim() == 2 and not pooled:
                pooled.append(args[0])

        handles = [self.get_submodule(name).register_forward_hook(keep_output) for name in self._zoo_taps]
        handles += [self.get_submodule(name).register_forward_pre_hook(keep_input)
                    for name in self._zoo_pooled_from]
        try:
            logits = self.forward(x)
        finally:
            for handle in handles:
                handle.remove()
        if self._zoo_by_resolution:
            maps = _last_per_resolution(maps)
        return [*maps, pooled[0]], logits

    def get_classifier(self, *_args: Any, **_kwargs: Any) -> nn.Linear:  # type: ignore[override]
        """The final linear layer (timm's own get_classifier arguments are accepted and ignored)."""
        classifier = self.get_submodule(self._zoo_classifier)
        assert isinstance(classifier, nn.Linear)
        return classifier


def _last_per_resolution(outputs: list[Any]) -> list[Tensor]:
    """The last 4-D map of each run of equal spatial size: stem and stage outputs of a trunk tapped child by child."""
    maps: list[Tensor] = []
    for out in outputs:
        if not isinstance(out, Tensor) or out.dim() != 4:
            continue
        if maps and maps[-1].shape[-2:] == out.shape[-2:]:
            maps[-1] = out
        else:
            maps.append(out)
    return maps


@functools.cache
def _adapted_class(cls: type[nn.Module]) -> type[LibraryClassifier]:
    """`cls` with the zoo interface mixed in; cached so every model of one library class shares one class."""
    return type(cls.__name__, (LibraryClassifier, cls), {"_library_cls": cls, "__module__": __name__})


def _classifier_name(model: nn.Module) -> str:
    """The qualified name of the final nn.Linear: timm's own get_classifier, else the last Linear registered."""
    getter = getattr(model, "get_classifier", None)
    candidate = getter() if callable(getter) else None
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, module in linears:
        if module is candidate:
            return name
    if candidate is None and linears:
        return linears[-1][0]
    raise NoLinearClassifierError(
        f"{type(model).__name__} has no final nn.Linear classifier (num_classes=0 or a convolutional head), which "
        "the distillers need; pick another model"
    )


def _default_taps(model: nn.Module, head: str) -> tuple[str, ...]:
    """Every child of the trunk: the `features` Sequential if there is one, else the top-level children but the head."""
    trunk = getattr(model, "features", None)
    if isinstance(trunk, nn.Sequential):
        return tuple(f"features.{name}" for name, _ in trunk.named_children())
    return tuple(name for name, _ in model.named_children() if name != head)


def adapt(model: nn.Module, taps: tuple[str, ...] | None = None) -> LibraryClassifier:
    """Give a torchvision/timm `model` the zoo interface in place (state_dict untouched); `taps`: stem, stages."""
    classifier = _classifier_name(model)
    head = classifier.split(".")[0]
    # The pooled vector is the input of the top-level head holding the classifier (before its dropout, as in the
    # zoo) when the head has no other parameters; an MLP head (VGG) or a normalising one (ConvNeXt) would make
    # get_classifier()(features[-1]) differ from the logits, so there it is the classifier's own input.
    head_params = {id(p) for p in model.get_submodule(head).parameters()}
    only_classifier = head_params == {id(p) for p in model.get_submodule(classifier).parameters()}
    by_resolution = taps is None
    model.__class__ = _adapted_class(type(model))
    model._zoo_taps = _default_taps(model, head) if taps is None else taps
    model._zoo_by_resolution = by_resolution
    model._zoo_pooled_from = (head, classifier) if only_classifier and head != classifier else (classifier,)
    model._zoo_classifier = classifier
    assert isinstance(model, LibraryClassifier)
    return model


def build_torchvision(name: str, num_classes: int = 1000, pretrained: bool = False, **kwargs: Any) -> LibraryClassifier:
    """torchvision's `name` with `num_classes` outputs; `kwargs` go to torchvision's builder.

    With `pretrained`, the model starts from torchvision's DEFAULT weights (``get_model_weights(name).DEFAULT``),
    downloaded into torch's hub cache (``torch.hub.get_dir()/checkpoints``) or read from it. When `num_classes`
    differs from the weights' (1000 for ImageNet), everything but the final classifier is loaded and the classifier
    keeps the fresh initialisation torchvision gives a `num_classes` model (a warning says so); otherwise the model is
    built by torchvision itself with the weights (``get_model(name, weights=...)``), exactly as the library does.
    A failed download raises PretrainedWeightsError naming the cache and the alternatives.
    """
    import torchvision

    if not pretrained:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        return adapt(model, _TORCHVISION_TAPS.get(type(model).__name__))
    weights = torchvision_weights(name)
    classes = len(weights.meta["categories"])
    label = f"torchvision.{name} ({type(weights).__name__}.{weights.name})"
    with pretrained_failures(label, weights.url, hub_checkpoints(), Path(weights.url).name):
        if num_classes == classes:
            model = torchvision.models.get_model(name, weights=weights, num_classes=num_classes, **kwargs)
            _log.info(f"{label}: loaded torchvision's pretrained weights")
            return adapt(model, _TORCHVISION_TAPS.get(type(model).__name__))
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        model = adapt(model, _TORCHVISION_TAPS.get(type(model).__name__))
        _load_all_but_classifier(model, weights.get_state_dict(progress=True, check_hash=True), label, classes)
    return model


def build_timm(name: str, num_classes: int = 1000, pretrained: bool = False, **kwargs: Any) -> LibraryClassifier:
    """timm's `name` with `num_classes` outputs; `kwargs` go to ``timm.create_model``.

    With `pretrained`, timm loads its own pretrained weights (``create_model(name, pretrained=True)``: from the
    Hugging Face Hub into its cache, or from a URL into torch's hub cache). When `num_classes` differs from the
    weights' (1000 for ImageNet-1k), timm loads everything but the classifier, which keeps its fresh initialisation
    (a warning says so). A failed download raises PretrainedWeightsError naming the cache and the alternatives.
    """
    import timm

    if not pretrained:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    else:
        cfg = timm_pretrained_cfg(name)
        label = f"timm.{name} ({cfg.hf_hub_id or cfg.url or cfg.file})"
        if cfg.hf_hub_id:
            from huggingface_hub import constants

            where = (f"the Hugging Face Hub repository {cfg.hf_hub_id}", constants.HF_HUB_CACHE, None,
                     " (with HF_HUB_OFFLINE=1 it is read without trying the network)")
        else:
            where = (cfg.url or str(cfg.file), hub_checkpoints(), Path(cfg.url).name if cfg.url else None, "")
        with pretrained_failures(label, *where):
            model = timm.create_model(name, pretrained=True, num_classes=num_classes, **kwargs)
        if num_classes != cfg.num_classes:
            _log.warning(head_reinitialised(label, cfg.classifier, cfg.num_classes, num_classes))
        else:
            _log.info(f"{label}: loaded timm's pretrained weights")
    info = getattr(model, "feature_info", None)
    # timm names each stage's module (stem first) in feature_info; models without it fall back to the generic taps.
    taps = tuple(entry["module"] for entry in info) if isinstance(info, list) and info else None
    return adapt(model, taps)


def _load_all_but_classifier(
    model: LibraryClassifier, state: dict[str, Tensor], label: str, pretrained_classes: int
) -> None:
    """Load `state` into `model` but for the classifier's weight and bias, which keep the model's initialisation."""
    head = model._zoo_classifier
    dropped = {f"{head}.weight", f"{head}.bias"}
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in dropped}, strict=False)
    if set(missing) - dropped or unexpected:
        raise RuntimeError(
            f"Error(s) in loading state_dict for {type(model).__name__}: missing keys {sorted(set(missing) - dropped)}"
            f", unexpected keys {unexpected}"
        )
    _log.warning(head_reinitialised(label, head, pretrained_classes, model.get_classifier().out_features))


def _unknown(library: str, name: str, available: list[str], listing: str) -> UnknownNameError:
    """An UnknownNameError for `library`.`name` with the closest of `available` and where to list them all."""
    close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(f'{library}.{c}') for c in close)}?" if close else ""
    return UnknownNameError(
        f"Unknown model '{library}.{name}': {library} has no model '{name}'.{hint} "
        f"All {len(available)} names: {listing}"
    )


def _resolve_torchvision(name: str) -> Any:
    """The builder of torchvision classification model `name`; unknown names raise UnknownNameError."""
    import torchvision

    # Classification models only: detection/segmentation/video models do not end in a classifier.
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise _unknown("torchvision", name, available, "torchvision.models.list_models(module=torchvision.models)")
    return functools.partial(build_torchvision, name)


def _resolve_timm(name: str) -> Any:
    """The builder of timm model `name`; unknown names raise UnknownNameError."""
    import timm

    if not timm.is_model(name):
        raise _unknown("timm", name, timm.list_models(), "timm.list_models()")
    return functools.partial(build_timm, name)


MODELS.register_prefix("torchvision.", _resolve_torchvision, "torchvision.<any torchvision classification model>")
MODELS.register_prefix("timm.", _resolve_timm, "timm.<any timm model>")


@MODELS.register()
def ResNet18(num_classes: int = 1000, **kwargs: Any) -> LibraryClassifier:
    """The paper's ImageNet ResNet-18: torchvision's resnet18, same state_dict (kwargs: `build_torchvision`'s)."""
    return build_torchvision("resnet18", num_classes, **kwargs)


@MODELS.register()
def ResNet34(num_classes: int = 1000, **kwargs: Any) -> LibraryClassifier:
    """The paper's ImageNet ResNet-34: torchvision's resnet34, same state_dict (kwargs: `build_torchvision`'s)."""
    return build_torchvision("resnet34", num_classes, **kwargs)


@MODELS.register()
def ResNet50_Imagenet(num_classes: int = 1000, **kwargs: Any) -> LibraryClassifier:
    """ImageNet ResNet-50: torchvision's resnet50, same state_dict (ResNet50 is the CIFAR model of the zoo)."""
    return build_torchvision("resnet50", num_classes, **kwargs)


@MODELS.register()
def MobileNetV2_Imagenet(num_classes: int = 1000, **kwargs: Any) -> LibraryClassifier:
    """The paper's ImageNet MobileNetV2: torchvision's mobilenet_v2, same state_dict."""
    return build_torchvision("mobilenet_v2", num_classes, **kwargs)


@MODELS.register()
def ShuffleV2_Imagenet(num_classes: int = 1000, **kwargs: Any) -> LibraryClassifier:
    """The paper's ImageNet ShuffleNetV2: torchvision's shufflenet_v2_x1_0, same state_dict."""
    return build_torchvision("shufflenet_v2_x1_0", num_classes, **kwargs)
