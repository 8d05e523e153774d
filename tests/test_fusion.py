"""Folding a frozen teacher's BatchNorms into its convolutions (models/fusion.py, runtime.fold_teacher_bn)."""
from __future__ import annotations

import copy
from pathlib import Path
from types import ModuleType

import pytest
import torch
from test_models import NAMES, _golden_model, _input
from torch import Tensor, nn

from conftest import ctkd_config, first_batch_step, load
from ctkd.build import build_experiment
from ctkd.distributed import DistributedContext
from ctkd.models import build_model
from ctkd.models.fusion import fold_batchnorm
from ctkd.system import seed_everything

ENTRY_POINTS = [lambda net, x: net(x), lambda net, x: net.forward_with_features(x)]


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny forwards: one thread


def _batchnorms(model: nn.Module) -> int:
    return sum(type(m) is nn.BatchNorm2d for m in model.modules())


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_a_folded_zoo_model_computes_the_authors_function(name: str, golden: ModuleType) -> None:
    """The golden weights' logits and every feature survive folding up to float rounding; every BatchNorm fed by a
    convolution is gone (WRN's pre-activation blocks keep the BNs that normalise a residual sum)."""
    model = _golden_model(golden, name).eval()
    original = copy.deepcopy(model)
    before = _batchnorms(model)
    folded = fold_batchnorm(model, torch.randn(2, 3, 32, 32), ENTRY_POINTS)
    assert folded > 0 and _batchnorms(model) == before - folded
    if not name.startswith("wrn"):
        assert _batchnorms(model) == 0
    else:  # conv1 → bn2 in each block; bn1 of a block normalises the sum of the previous one
        assert folded == sum(1 for n, _ in model.named_modules() if n.endswith(".conv1") and "block" in n)
    x = _input(golden)
    with torch.no_grad():
        logits = model(x)
        features, logits_f = model.forward_with_features(x)
        expected_features, _ = original.forward_with_features(x)
    reference = golden.reference_logits(name, "eval")  # the deep ResNets' golden logits reach ~1e4: relative rounding
    torch.testing.assert_close(logits, reference, atol=1e-4 * max(1.0, reference.abs().max().item()), rtol=0)
    torch.testing.assert_close(logits_f, logits, atol=0, rtol=0)
    for got, expected in zip(features, expected_features, strict=True):  # float rounding of the largest activations
        torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


class _ConvUsedTwice(nn.Module):
    """A conv whose output goes to a BatchNorm and, unnormalised, into the sum too: folding would change it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return self.bn2(self.conv2(self.bn(y) + y))


def _randomised(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that a wrong fold shows."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


def test_a_conv_output_used_elsewhere_is_not_folded_and_the_rest_is() -> None:
    model = _randomised(_ConvUsedTwice())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    assert fold_batchnorm(model, torch.randn(2, 3, 8, 8)) == 1  # conv2 → bn2 only
    assert isinstance(model.bn, nn.BatchNorm2d) and isinstance(model.bn2, nn.Identity)
    assert model.conv.bias is not None and model.conv2.bias is not None  # conv had a bias; conv2 has the folded one
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_only_an_eval_model_can_be_folded() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(_ConvUsedTwice().train(), torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("name", ["torchvision.resnet18"])
def test_library_models_fold_too(name: str) -> None:
    model = _randomised(build_model(name, num_classes=10))
    original = copy.deepcopy(model)
    assert fold_batchnorm(model, torch.randn(1, 3, 64, 64), ENTRY_POINTS) == 20 and _batchnorms(model) == 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------- runtime.fold_teacher_bn
@pytest.mark.parametrize("method", ["kd", "vid"])
def test_fold_teacher_bn_leaves_the_loss_and_the_step_within_fp32_tolerance(tmp_path: Path, method: str) -> None:
    """The default (folded teacher) against runtime.fold_teacher_bn=false: same losses on a fixed batch, same
    weights after one step; the student keeps its BatchNorms (it trains)."""
    torch.manual_seed(5)
    teacher_file = tmp_path / "resnet14_trained.pth"  # BatchNorm statistics as after training, not the initial 0/1
    torch.save({"model": _randomised(build_model("resnet14", num_classes=10)).state_dict()}, teacher_file)
    results = []
    for fold in (False, True):
        cfg = load(ctkd_config(tmp_path, teacher_file, method=method, runtime={"fold_teacher_bn": fold}), tmp_path,
                   f"{method}_{fold}.yaml")
        seed_everything(cfg.seed)
        exp = build_experiment(cfg, DistributedContext())
        teacher, student = exp.distiller.teacher, exp.distiller.student
        assert (_batchnorms(teacher) == 0) is fold and _batchnorms(student) > 0
        results.append(first_batch_step(exp))
        exp.close()
    (losses_a, weights_a), (losses_b, weights_b) = results
    assert losses_a.keys() == losses_b.keys()
    for key in losses_a:
        torch.testing.assert_close(losses_b[key], losses_a[key], rtol=1e-5, atol=1e-6, msg=key)
    for key in weights_a:
        torch.testing.assert_close(weights_b[key], weights_a[key], rtol=1e-4, atol=1e-6, msg=key)


class _TwoStages(nn.Module):
    """conv → bn → relu → conv2 → bn2, returning a dict with a None entry (outputs of any nesting are compared)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> dict[str, Tensor | None]:
        hidden = torch.relu(self.bn(self.conv(x)))
        return {"out": self.bn2(self.conv2(hidden)), "aux": None, "stages": [hidden]}


def test_modules_with_hooks_of_their_own_are_left_alone() -> None:
    """A hook may compute the weight (old weight_norm) or watch the BatchNorm: such pairs are not folded."""
    model = _randomised(_TwoStages())
    model.conv.register_forward_pre_hook(lambda module, args: None)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)["out"]
    assert fold_batchnorm(model, torch.randn(2, 3, 8, 8)) == 1
    assert isinstance(model.bn, nn.BatchNorm2d) and isinstance(model.bn2, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(x)["out"], expected, atol=1e-5, rtol=1e-5)
