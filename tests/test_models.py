"""The CIFAR model zoo against the authors': checkpoint layout, golden logits, features, classifier, registry."""
from __future__ import annotations

from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctkd.models import MODELS, FeatureClassifier, build_model, list_models
from ctkd.models.cifar.layers import channel_shuffle

NAMES = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
    "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19",
    "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50",
]  # fmt: skip
PREACT_NAMES = NAMES  # every CIFAR model has pre-activation features (ResNet50: RepDistiller's resnetv2 preact)
NO_ZOO_PREACT_SHAPES = {"ResNet50"}  # the authors' zoo lists none for it: their copy of ResNet50 drops preact


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny forwards: one thread


def _golden_model(golden: ModuleType, name: str) -> FeatureClassifier:
    """`name` built for 100 classes with the reference data's deterministic weights loaded strictly."""
    model = build_model(name)
    model.load_state_dict(golden.reference_state_dict(name), strict=True)
    return model


def _input(golden: ModuleType, batch: int = 2) -> Tensor:
    """The first `batch` images of the golden input (2, 3, 32, 32)."""
    return golden.reference_input()[:batch]


def _batches_tracked(model: nn.Module) -> set[int]:
    """The distinct num_batches_tracked values of all BatchNorm layers."""
    return {int(m.num_batches_tracked) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}


def test_registry_holds_exactly_the_zoo(golden: ModuleType) -> None:
    # Tests may register helper models of their own (tests/tiny_models.py); the package registers the zoo.
    zoo = [name for name in list_models() if MODELS.get(name).__module__.startswith("ctkd.models.cifar")]
    assert zoo == sorted(NAMES) == golden.architectures()
    imagenet = {name for name in list_models() if MODELS.get(name).__module__ == "ctkd.models.imagenet"}
    assert imagenet == {"ResNet18", "ResNet34", "ResNet50_Imagenet", "MobileNetV2_Imagenet", "ShuffleV2_Imagenet"}


@pytest.mark.parametrize("name", NAMES)
def test_builder_function_is_named_like_its_key(name: str) -> None:
    assert MODELS.get(name).__name__ == name


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(ValueError, match=r"Unknown model 'resnet21'.*'resnet20'"):
        build_model("resnet21")


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_layout_matches_zoo(name: str, zoo: dict) -> None:
    state = build_model(name).state_dict()
    layout = [[key, list(value.shape), str(value.dtype).removeprefix("torch.")] for key, value in state.items()]
    assert layout == zoo[name]["state_dict"]


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_matches_zoo(name: str, zoo: dict) -> None:
    model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == zoo[name]["params_total"]


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", NAMES)
def test_golden_logits(name: str, mode: str, golden: ModuleType) -> None:
    model = _golden_model(golden, name).train(mode == "train")
    with torch.no_grad():
        logits = model(_input(golden))
    torch.testing.assert_close(logits, golden.reference_logits(name, mode), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_feature_shapes_match_zoo(name: str, golden: ModuleType, zoo: dict) -> None:
    model = _golden_model(golden, name).eval()
    with torch.no_grad():
        features, _ = model.forward_with_features(_input(golden, batch=1))
    assert [list(f.shape) for f in features] == zoo[name]["feat_shapes"]
    assert features[-1].dim() == 2 and features[-2].dim() == 4


@pytest.mark.parametrize("name", [name for name in NAMES if name not in NO_ZOO_PREACT_SHAPES])
def test_preact_feature_shapes_match_zoo(name: str, golden: ModuleType, zoo: dict) -> None:
    model = _golden_model(golden, name).eval()
    with torch.no_grad():
        features, _ = model.forward_with_features(_input(golden, batch=1), preact=True)
    assert [list(f.shape) for f in features] == zoo[name]["preact_feat_shapes"]


def test_resnet50_preact_features_have_the_zoo_shapes_and_negative_values(golden: ModuleType, zoo: dict) -> None:
    """RepDistiller's ResNet50 gives each stage's last block before its ReLU: the zoo's shapes, not clipped at 0."""
    model = _golden_model(golden, "ResNet50").eval()
    with torch.no_grad():
        preacts, _ = model.forward_with_features(_input(golden, batch=1), preact=True)
    assert [list(f.shape) for f in preacts] == zoo["ResNet50"]["feat_shapes"]
    assert all((f < 0).any() for f in preacts[1:-1])


def _preact_pairs(
    name: str, model: nn.Module, features: list[Tensor], preacts: list[Tensor]
) -> list[tuple[Tensor, Tensor]]:
    """(value derived from a preact stage feature, value it must equal) under the authors' definition per family."""
    plain, pre = features[1:-1], preacts[1:-1]
    if name.startswith("wrn"):  # the next BN (without ReLU) applied to the stage output
        bns = (model.block2.layer[0].bn1, model.block3.layer[0].bn1, model.bn1)
        return [(p, bn(f)) for p, bn, f in zip(pre, bns, plain, strict=True)]
    if name == "ShuffleV2":  # taken before the unit's channel shuffle
        return [(channel_shuffle(F.relu(p), 2), f) for p, f in zip(pre, plain, strict=True)]
    if name == "MobileNetV2":  # linear-bottleneck outputs have no final ReLU
        return list(zip(pre, plain, strict=True))
    return [(F.relu(p), f) for p, f in zip(pre, plain, strict=True)]


@pytest.mark.parametrize("name", PREACT_NAMES)
def test_preact_features_follow_authors_definition(name: str, golden: ModuleType) -> None:
    model = _golden_model(golden, name).eval()
    with torch.no_grad():
        features, logits = model.forward_with_features(_input(golden))
        preacts, preact_logits = model.forward_with_features(_input(golden), preact=True)
        pairs = _preact_pairs(name, model, features, preacts)
    assert len(pairs) == len(features) - 2
    for derived, expected in pairs:
        torch.testing.assert_close(derived, expected)
    torch.testing.assert_close(preacts[0], features[0])
    torch.testing.assert_close(preacts[-1], features[-1])
    torch.testing.assert_close(preact_logits, logits)


@pytest.mark.parametrize(
    "name,preact", [(name, False) for name in NAMES] + [(name, True) for name in PREACT_NAMES]
)
def test_train_forward_updates_each_batchnorm_once(name: str, preact: bool, golden: ModuleType) -> None:
    """The authors' WRN re-applies three BNs for preact; ours runs every BN exactly once per call."""
    model = _golden_model(golden, name).train()
    with torch.no_grad():
        model.forward_with_features(_input(golden), preact=preact)
    assert _batches_tracked(model) == {1}


@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_forward_with_features(name: str, golden: ModuleType, capsys: pytest.CaptureFixture) -> None:
    model = _golden_model(golden, name).eval()
    with torch.no_grad():
        logits = model(_input(golden))
        features, feature_logits = model.forward_with_features(_input(golden))
    assert type(logits) is Tensor
    assert isinstance(features, list) and all(isinstance(f, Tensor) for f in features)
    assert torch.equal(logits, feature_logits)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("num_classes", [100, 10])
@pytest.mark.parametrize("name", NAMES)
def test_get_classifier_is_the_final_linear(name: str, num_classes: int, golden: ModuleType) -> None:
    """The classifier maps the pooled vector to the logits in every family (docs/differences.md)."""
    model = build_model(name, num_classes=num_classes).eval()
    classifier = model.get_classifier()
    assert isinstance(classifier, nn.Linear) and classifier.out_features == num_classes
    assert any(module is classifier for module in model.modules())
    with torch.no_grad():
        features, logits = model.forward_with_features(_input(golden))
        assert logits.shape == (2, num_classes)
        torch.testing.assert_close(classifier(features[-1]), logits)


def test_vgg_pools_before_last_stage_only_at_64px() -> None:
    model = build_model("vgg8").eval()
    with torch.no_grad():
        small, _ = model.forward_with_features(torch.randn(1, 3, 32, 32))
        large, _ = model.forward_with_features(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in small[:-1]] == [32, 16, 8, 4, 4]
    assert [f.shape[-1] for f in large[:-1]] == [64, 32, 16, 8, 4]
