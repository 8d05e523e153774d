"""torchvision/timm models in the registry: the paper's ImageNet names, namespaces, features, strict teacher loading."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from ctkd.__main__ import main as ctkd_main
from ctkd.build import identify_architectures
from ctkd.checkpoint import load_weights_strict
from ctkd.registry import UnknownNameError
from models import MODELS, FeatureClassifier, build_model, list_models

# The paper's ImageNet names and the torchvision architectures they are.
PAPER_NAMES = ["ResNet18", "ResNet34", "MobileNetV2_Imagenet", "ShuffleV2_Imagenet"]


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """One thread: as fast for these small forwards, and far faster when other processes share the CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", PAPER_NAMES)
def test_paper_names_have_the_authors_state_dict_layout(name: str, zoo: dict) -> None:
    # Built on the meta device: only keys and shapes matter, and ImageNet models are large to initialise.
    with torch.device("meta"):
        model = build_model(name, num_classes=zoo[name]["num_classes"])
    layout = [[key, list(value.shape)] for key, value in model.state_dict().items()]
    assert layout == [entry[:2] for entry in zoo[name]["state_dict"]]
    assert isinstance(model, FeatureClassifier) and not model.supports_preact


def test_resnet18_feature_shapes_at_224_match_the_authors(zoo: dict) -> None:
    model = build_model("ResNet18", num_classes=1000).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        features, logits = model.forward_with_features(x)
    assert [list(f.shape) for f in features] == zoo["ResNet18"]["feat_shapes"]
    assert list(logits.shape) == zoo["ResNet18"]["logits_shape"]


def test_torchvision_state_dict_file_loads_strictly_into_resnet34(tmp_path: Path) -> None:
    # The authors' ImageNet teacher is a bare torchvision state_dict.
    source = torchvision.models.resnet34(num_classes=10)
    path = tmp_path / "resnet34.pth"
    torch.save(source.state_dict(), path)
    model = build_model("ResNet34", num_classes=10)
    load_weights_strict(model, path, arch="ResNet34", key="teacher.name")
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert identify_architectures(source.state_dict(), 10) == ["ResNet34"]


@pytest.mark.parametrize("name", ["torchvision.resnet18", "timm.resnet18"])
def test_library_models_implement_the_zoo_interface(name: str) -> None:
    assert name in MODELS
    model = build_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        features, feature_logits = model.forward_with_features(x)
    assert logits.shape == (2, 10)
    assert torch.equal(feature_logits, logits)
    assert features[-1].shape == (2, 512)
    assert [f.dim() for f in features] == [4] * (len(features) - 1) + [2]
    classifier = model.get_classifier()
    assert isinstance(classifier, nn.Linear) and classifier.out_features == 10
    torch.testing.assert_close(classifier(features[-1]), logits)
    with pytest.raises(ValueError, match="no pre-activation features"):
        model.forward_with_features(x, preact=True)


def test_library_state_dict_keys_are_the_librarys_own() -> None:
    # No wrapper prefix: a file saved from the library model loads as it is.
    model = build_model("torchvision.resnet18", num_classes=10)
    assert list(model.state_dict()) == list(torchvision.models.resnet18(num_classes=10).state_dict())


def test_features_backpropagate_in_train_mode() -> None:
    model = build_model("timm.resnet18", num_classes=10).train()
    features, logits = model.forward_with_features(torch.randn(2, 3, 64, 64))
    (features[-2].mean() + logits.sum()).backward()
    assert model.get_classifier().weight.grad is not None


@pytest.mark.parametrize(("name", "hint"), [
    ("timm.resnet1000", r"Unknown model 'timm.resnet1000'.*Did you mean .*'timm\.resnet\w+'.*timm\.list_models\(\)"),
    ("torchvision.nope", r"Unknown model 'torchvision.nope'.*torchvision\.models\.list_models"),
])  # fmt: skip
def test_unknown_library_name_is_a_clear_error(name: str, hint: str) -> None:
    assert name not in MODELS
    with pytest.raises(UnknownNameError, match=hint):
        build_model(name)


def test_namespaces_are_listed_but_not_enumerated(capsys: pytest.CaptureFixture) -> None:
    assert set(PAPER_NAMES) <= set(list_models())
    assert not any(name.startswith(("timm.", "torchvision.")) for name in list_models())
    assert ctkd_main(["list", "models"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "resnet32x4" in out and "ResNet18" in out
    assert "timm.<any timm model>" in out
    assert any(line.startswith("torchvision.<") for line in out)
