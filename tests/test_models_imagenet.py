"""torchvision/timm models in the registry: the paper's ImageNet names, namespaces, features, strict teacher loading,
builder kwargs, library pretrained weights (offline, other head sizes), student weight files, family identification."""
from __future__ import annotations

import logging
import socket
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
import torch.hub
import torchvision
from torch import nn

import ctkd.models as models
from conftest import ctkd_config, load, tiny_run_config
from ctkd.__main__ import main as ctkd_main
from ctkd.build import check_inputs
from ctkd.config import Config, ConfigError
from ctkd.integrity import CheckpointError
from ctkd.models import (
    MODELS,
    FeatureClassifier,
    ModelArgumentError,
    PretrainedWeightsError,
    build_model,
    list_models,
)
from ctkd.networks import build_student, check_model_names, identify_architectures, load_teacher
from ctkd.registry import UnknownNameError

# The paper's ImageNet names and the torchvision architectures they are.
PAPER_NAMES = ["ResNet18", "ResNet34", "MobileNetV2_Imagenet", "ShuffleV2_Imagenet"]


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny forwards: one thread


@pytest.fixture
def model_log() -> Iterator[list[str]]:
    """The messages of the models' logger (attached directly: the project's logger may not propagate to pytest's)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("ctkd.models")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield messages
    logger.removeHandler(handler)
    logger.setLevel(level)


def _student_config(tmp_path: Path, **student: object) -> Config:
    """A vanilla run config whose student section is `student`."""
    return load(tiny_run_config(tmp_path, student=student, method="vanilla"), tmp_path)


def _teacher_config(tmp_path: Path, teacher_file: Path, **teacher: object) -> Config:
    """A KD run config (student resnet8) whose teacher section is `teacher`."""
    return load(ctkd_config(tmp_path, teacher_file, teacher=teacher), tmp_path)


def _fake_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of `state` with every floating tensor replaced by a distinct constant: recognisable after loading."""
    return {k: torch.full_like(v, i + 0.5) if v.is_floating_point() else v.clone()
            for i, (k, v) in enumerate(state.items())}


# ---------------------------------------------------------------------------------------------- the zoo's names
@pytest.mark.parametrize("name", PAPER_NAMES)
def test_paper_names_have_the_authors_state_dict_layout(name: str, zoo: dict) -> None:
    # Built on the meta device: only keys and shapes matter, and ImageNet models are large to initialise.
    with torch.device("meta"):
        model = build_model(name, num_classes=zoo[name]["num_classes"])
    layout = [[key, list(value.shape)] for key, value in model.state_dict().items()]
    assert layout == [entry[:2] for entry in zoo[name]["state_dict"]]
    assert isinstance(model, FeatureClassifier) and not model.supports_preact


def test_resnet50_imagenet_is_torchvisions_resnet50_and_resnet50_stays_the_cifar_model() -> None:
    with torch.device("meta"):
        ours = build_model("ResNet50_Imagenet", num_classes=1000).state_dict()
        library = torchvision.models.resnet50().state_dict()
        cifar = build_model("ResNet50", num_classes=100)
    assert [(k, v.shape) for k, v in ours.items()] == [(k, v.shape) for k, v in library.items()]
    assert type(cifar).__module__.startswith("ctkd.models.cifar")
    assert models.library_model("ResNet50_Imagenet") == ("torchvision", "resnet50")
    assert models.library_model("ResNet50") is None


def test_resnet18_feature_shapes_at_224_match_the_authors(zoo: dict) -> None:
    model = build_model("ResNet18", num_classes=1000).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        features, logits = model.forward_with_features(x)
    assert [list(f.shape) for f in features] == zoo["ResNet18"]["feat_shapes"]
    assert list(logits.shape) == zoo["ResNet18"]["logits_shape"]


@pytest.mark.slow
def test_torchvision_state_dict_file_loads_strictly_into_resnet34_teacher(tmp_path: Path, teacher_file: Path) -> None:
    # The authors' ImageNet teacher is a bare torchvision state_dict of 1000 classes; the config names ResNet34.
    torch.manual_seed(0)
    source = torchvision.models.resnet34().eval()
    path = tmp_path / "resnet34-imagenet.pth"
    torch.save(source.state_dict(), path)
    cfg = _teacher_config(tmp_path, teacher_file, name="ResNet34", checkpoint=str(path))
    teacher = load_teacher(cfg, num_classes=1000).eval()
    for key, value in source.state_dict().items():
        assert torch.equal(teacher.state_dict()[key], value), key
    x = torch.randn(1, 3, 32, 32)  # any size: the ResNet pools adaptively
    with torch.no_grad():
        assert torch.equal(teacher(x), source(x))
    assert identify_architectures(source.state_dict(), 1000) == ["ResNet34"]


# ---------------------------------------------------------------------------------------------- interface, features
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
    classifier = model.get_classifier()
    assert isinstance(classifier, nn.Linear) and classifier.out_features == 10
    torch.testing.assert_close(classifier(features[-1]), logits)
    with pytest.raises(ValueError, match="no pre-activation features"):
        model.forward_with_features(x, preact=True)


# At 64×64: the stem output, each stage's output, then the pooled vector (B, C) that the classifier takes.
FEATURE_SHAPES = {
    "torchvision.resnet18": [(2, 64, 16, 16), (2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2),
                             (2, 512)],
    "timm.resnet18": [(2, 64, 32, 32), (2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2), (2, 512)],
    # conv_head (576 → 1024) comes after pooling: the pooled vector is the classifier's 1024-wide input
    "timm.mobilenetv3_small_050": [(2, 16, 32, 32), (2, 8, 16, 16), (2, 16, 8, 8), (2, 24, 4, 4), (2, 288, 2, 2),
                                   (2, 1024)],
}  # fmt: skip


@pytest.mark.parametrize("name", list(FEATURE_SHAPES))
def test_library_feature_shapes_and_classifier_on_the_pooled_vector(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10).eval()
    with torch.no_grad():
        features, logits = model.forward_with_features(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == FEATURE_SHAPES[name]
    torch.testing.assert_close(model.get_classifier()(features[-1]), logits)


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
    assert {*PAPER_NAMES, "ResNet50_Imagenet"} <= set(list_models())
    assert not any(name.startswith(("timm.", "torchvision.")) for name in list_models())
    assert ctkd_main(["list", "models"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "resnet32x4" in out and "ResNet18" in out
    assert "timm.<any timm model>" in out
    assert any(line.startswith("torchvision.<") for line in out)


# ---------------------------------------------------------------------------------------------- kwargs
def test_student_kwargs_reach_the_builder(tmp_path: Path) -> None:
    timm_student = build_student(_student_config(tmp_path, name="timm.resnet18", kwargs={"drop_rate": 0.25}), 10)
    assert timm_student.drop_rate == 0.25
    torchvision_student = build_student(
        _student_config(tmp_path, name="torchvision.resnet18", kwargs={"zero_init_residual": True}), 10
    )
    last_bns = [block.bn2.weight for layer in ("layer1", "layer4") for block in getattr(torchvision_student, layer)]
    assert all(not weight.any() for weight in last_bns)


def test_teacher_kwargs_reach_the_builder_and_the_file_still_loads(tmp_path: Path, teacher_file: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "timm_resnet18.pth"
    torch.save({"state_dict": timm.create_model("resnet18", num_classes=10).state_dict()}, path)
    cfg = _teacher_config(tmp_path, teacher_file, name="timm.resnet18", checkpoint=str(path), kwargs={"drop_rate": 0.1})
    assert load_teacher(cfg, num_classes=10).drop_rate == 0.1


@pytest.mark.parametrize(("section", "name", "kwargs", "message"), [
    ("student", "timm.resnet18", {"dropout": 0.1},
     r"^student\.kwargs: model 'timm\.resnet18' does not take the keyword argument 'dropout'; it takes: .*drop_rate"),
    ("student", "ResNet18", {"dropout": 0.1},
     r"^student\.kwargs: model 'ResNet18' does not take .*'dropout'; it takes: zero_init_residual, groups"),
    ("student", "resnet8", {"width": 2},
     r"^student\.kwargs: model 'resnet8' does not take .*'width'; it takes no keyword arguments besides num_classes"),
    ("teacher", "resnet14", {"depth": 20}, r"^teacher\.kwargs: model 'resnet14' does not take .*'depth'"),
    ("student", "timm.resnet18", {"num_classes": 5}, r"^student\.kwargs: 'num_classes' is not an extra keyword"),
    ("student", "torchvision.resnet18", {"pretrained": True}, r"^student\.kwargs: 'pretrained' .*option of its own"),
])  # fmt: skip
def test_bad_kwargs_are_reported_before_any_work_naming_the_key(
    tmp_path: Path, teacher_file: Path, section: str, name: str, kwargs: dict, message: str
) -> None:
    if section == "student":
        cfg = _student_config(tmp_path, name=name, kwargs=kwargs)
    else:
        cfg = _teacher_config(tmp_path, teacher_file, name=name, checkpoint=str(teacher_file), kwargs=kwargs)
    with pytest.raises(ModelArgumentError, match=message):
        check_inputs(cfg)
    if section == "student":  # the build itself says the same (no raw TypeError from the builder)
        with pytest.raises(ModelArgumentError, match=message):
            build_student(cfg, 10)


# ---------------------------------------------------------------------------------------------- pretrained
def _offline_torch_hub(monkeypatch: pytest.MonkeyPatch, hub: Path) -> None:
    """An empty torch hub cache, and the URLError a download raises without network (no name resolution)."""

    def no_network(*_args: object, **_kwargs: object) -> None:
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    monkeypatch.setattr(torch.hub, "urlopen", no_network)


def test_pretrained_torchvision_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _offline_torch_hub(monkeypatch, tmp_path / "hub")
    cfg = _student_config(tmp_path, name="ResNet18", pretrained=True)
    check_inputs(cfg)  # weights exist for ResNet18: nothing is downloaded before the build
    with pytest.raises(PretrainedWeightsError) as info:
        build_student(cfg, 1000)
    message = str(info.value)
    assert message.startswith("student.pretrained: cannot get the pretrained weights of torchvision.resnet18")
    assert "URLError" in message and "Name or service not known" in message
    assert f"{tmp_path / 'hub' / 'checkpoints'}, " in message and "copy resnet18-f37072fd.pth there" in message
    assert "student.weights: PATH" in message and "teacher.checkpoint: PATH" in message
    assert "\n" not in message


def test_pretrained_timm_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError
    from timm.models import _hub

    def no_network(*_args: object, **_kwargs: object) -> None:  # what hf_hub_download raises offline, cache empty
        raise LocalEntryNotFoundError(
            "An error happened while trying to locate the file on the Hub and we cannot find the requested files in "
            "the local cache. Please check your connection and try again or make sure your Internet connection is on."
        )

    monkeypatch.setattr(_hub, "hf_hub_download", no_network)
    with pytest.raises(PretrainedWeightsError) as info:
        build_student(_student_config(tmp_path, name="timm.resnet18", pretrained=True), 10)
    message = str(info.value)
    assert message.startswith("student.pretrained: cannot get the pretrained weights of timm.resnet18")
    assert "LocalEntryNotFoundError" in message and f"its cache, {constants.HF_HUB_CACHE}" in message
    assert "HF_HUB_OFFLINE=1" in message and "student.weights: PATH" in message


def test_pretrained_teacher_offline_is_a_clear_error(
    tmp_path: Path, teacher_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _offline_torch_hub(monkeypatch, tmp_path / "hub")
    cfg = _teacher_config(tmp_path, teacher_file, name="ResNet34", checkpoint=None, pretrained=True)
    check_inputs(cfg)  # no checkpoint needed: teacher.pretrained
    with pytest.raises(PretrainedWeightsError, match=r"^teacher\.pretrained: cannot get .*torchvision\.resnet34.*"
                       r"teacher\.checkpoint: PATH"):
        load_teacher(cfg, num_classes=1000)


def test_pretrained_teacher_needs_the_datasets_number_of_classes(tmp_path: Path, teacher_file: Path) -> None:
    cfg = _teacher_config(tmp_path, teacher_file, name="ResNet34", checkpoint=None, pretrained=True)
    with pytest.raises(ConfigError, match=r"classifies 1000 classes, but the dataset \(synthetic\) has 10.*"
                       r"teacher\.checkpoint=PATH"):
        load_teacher(cfg, num_classes=10)


def test_pretrained_and_a_teacher_checkpoint_together_are_refused(tmp_path: Path, teacher_file: Path) -> None:
    cfg = _teacher_config(tmp_path, teacher_file, name="ResNet34", checkpoint=str(teacher_file), pretrained=True)
    with pytest.raises(ConfigError, match="teacher.checkpoint=null .* or teacher.pretrained=false"):
        check_inputs(cfg)


@pytest.mark.parametrize("section", ["student", "teacher"])
def test_pretrained_cifar_model_is_a_clear_error(tmp_path: Path, teacher_file: Path, section: str) -> None:
    if section == "student":
        cfg = _student_config(tmp_path, name="resnet8", pretrained=True)
    else:
        cfg = _teacher_config(tmp_path, teacher_file, name="resnet14", checkpoint=None, pretrained=True)
    with pytest.raises(PretrainedWeightsError, match=rf"^{section}\.pretrained: model 'resnet\d+' has no library "
                       r"pretrained weights: .*ResNet50_Imagenet.*student\.weights: PATH.*teacher\.checkpoint: PATH"):
        check_model_names(cfg)


def test_timm_model_without_pretrained_weights_is_a_clear_error(tmp_path: Path) -> None:
    cfg = _student_config(tmp_path, name="timm.botnet50ts_256", pretrained=True)
    with pytest.raises(PretrainedWeightsError, match=r"timm has no pretrained weights for timm\.botnet50ts_256"):
        check_model_names(cfg)


def test_pretrained_torchvision_with_another_head_loads_all_but_the_classifier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_log: list[str]
) -> None:
    # The library's "download" returns a recognisable state_dict; the rest of torchvision's loading path is real.
    with torch.device("meta"):
        layout = torchvision.models.resnet18().state_dict()
    fake = _fake_weights({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in layout.items()})
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda *_a, **_k: dict(fake))
    torch.manual_seed(0)
    student = build_student(_student_config(tmp_path, name="torchvision.resnet18", pretrained=True), 10)
    state = student.state_dict()
    assert all(torch.equal(state[k], v) for k, v in fake.items() if not k.startswith("fc."))
    assert state["fc.weight"].shape == (10, 512) and state["fc.weight"].std() > 0  # torchvision's fresh init
    assert any("except the classifier fc" in m and "newly initialised" in m for m in model_log), model_log
    # with the weights' 1000 classes torchvision loads them all itself
    full = build_model("ResNet18", num_classes=1000, pretrained=True).state_dict()
    assert all(torch.equal(full[k], v) for k, v in fake.items())


def test_pretrained_timm_with_another_head_loads_all_but_the_classifier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_log: list[str]
) -> None:
    from timm.models import _builder

    with torch.device("meta"):
        layout = timm.create_model("resnet18").state_dict()
    fake = _fake_weights({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in layout.items()})
    monkeypatch.setattr(_builder, "load_state_dict_from_hf", lambda *_a, **_k: dict(fake))
    cfg = _student_config(tmp_path, name="timm.resnet18", pretrained=True, kwargs={"drop_rate": 0.2})
    student = build_student(cfg, 10)
    state = student.state_dict()
    assert all(torch.equal(state[k], v) for k, v in fake.items() if not k.startswith("fc."))
    assert state["fc.weight"].shape == (10, 512) and not torch.equal(state["fc.weight"][0], fake["fc.weight"][0])
    assert student.drop_rate == 0.2
    assert any("except the classifier fc" in m for m in model_log), model_log


# ---------------------------------------------------------------------------------------------- student.weights
def test_student_weights_file_loads_strictly(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = build_model("resnet8", num_classes=10).state_dict()
    path = tmp_path / "init.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.items()}}, path)  # DDP-saved, wrapped
    cfg = _student_config(tmp_path, name="resnet8", weights=str(path))
    check_inputs(cfg)
    student = build_student(cfg, 10)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in source.items())


@pytest.mark.slow
def test_student_weights_of_another_architecture_name_it(tmp_path: Path) -> None:
    path = tmp_path / "resnet14.pth"
    torch.save({"model": build_model("resnet14", num_classes=10).state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"(?s)does not match architecture 'resnet8'.*set student\.name=resnet14"):
        build_student(_student_config(tmp_path, name="resnet8", weights=str(path)), 10)


def test_missing_student_weights_fail_before_any_work(tmp_path: Path) -> None:
    cfg = _student_config(tmp_path, name="resnet8", weights=str(tmp_path / "nope.pth"))
    with pytest.raises(CheckpointError, match=r"^student\.weights .*nope\.pth does not exist"):
        check_inputs(cfg)


def test_student_weights_and_pretrained_together_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "init.pth"
    torch.save(build_model("ResNet18", num_classes=10).state_dict(), path)
    cfg = _student_config(tmp_path, name="ResNet18", weights=str(path), pretrained=True)
    with pytest.raises(ConfigError, match="student.pretrained=false .* or student.weights=null"):
        check_inputs(cfg)


# ---------------------------------------------------------------------------------------------- identification
@pytest.fixture
def built_names(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of every model built through models.build_model (as identify_architectures builds them)."""
    names: list[str] = []
    original = models.build_model

    def counting(name: str, *args: object, **kwargs: object) -> nn.Module:
        names.append(name)
        return original(name, *args, **kwargs)

    monkeypatch.setattr(models, "build_model", counting)
    return names


def _meta_state(build: object) -> dict[str, torch.Tensor]:
    """The state_dict (keys and shapes only) of the model `build()` makes on the meta device."""
    with torch.device("meta"):
        return build().state_dict()  # type: ignore[operator]


def test_identification_of_a_zoo_name_searches_the_zoo_only(built_names: list[str]) -> None:
    state = _meta_state(lambda: torchvision.models.resnet34())
    assert identify_architectures(state, 1000, like="ResNet18") == ["ResNet34"]
    assert set(built_names) == set(list_models())


@pytest.mark.slow
def test_identification_of_a_timm_name_searches_its_family_only(built_names: list[str]) -> None:
    # timm holds over a thousand models; a resnet18 config with a resnet34 file builds at most 50 resnet* ones.
    state = _meta_state(lambda: timm.create_model("resnet34", num_classes=10))
    matches = identify_architectures(state, 10, like="timm.resnet18")
    assert matches[0] == "timm.resnet34" and all(m.startswith("timm.resnet") for m in matches)
    assert 0 < len(built_names) <= 50
    assert all(name.startswith("timm.resnet") for name in built_names)


def test_identification_of_a_torchvision_name_in_the_teachers_mismatch_message(
    tmp_path: Path, teacher_file: Path, built_names: list[str]
) -> None:
    path = tmp_path / "resnet50.pth"
    with torch.device("meta"):
        source = torchvision.models.resnet50(num_classes=10)
    torch.save(source.to_empty(device="cpu").state_dict(), path)  # the values do not matter here
    cfg = _teacher_config(tmp_path, teacher_file, name="torchvision.resnet34", checkpoint=str(path))
    with pytest.raises(CheckpointError, match=r"matches architecture\(s\): torchvision\.resnet50; "
                       r"set teacher\.name=torchvision\.resnet50$"):
        load_teacher(cfg, num_classes=10)
    searched = built_names[1:]  # the first build is the configured teacher itself
    assert searched and all(name.startswith("torchvision.resnet") for name in searched)
