"""OFD (Heo et al., ICCV 2019): margin and loss against independent float64 formulas, the BatchNorm each stage's margin
comes from, where gradients go, one step on zoo pairs, the errors for models without pre-activations, a tiny run.

Constants and where they come from: the margin m = E[x | x < 0] for x ~ N(β, γ²) with the fallback −3|γ| when
P(x < 0) ≤ 0.001 (the paper's margin; clovaai/mdistiller ``get_margin_from_BN``); the partial L2 in mdistiller's
three-case ``feat_loss`` form, averaged over the batch; pair i of n weighted 1/2^(n−i−1) and β = 1e-3 (mdistiller
``OFD.py`` and CFG.OFD.LOSS.FEAT_WEIGHT); the connector conv ~ N(0, 2/(k²·C_t)), BN γ = 1, β = 0 (``ConnectorConvBN``).
"""
from __future__ import annotations

import copy
import functools
import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import ctkd.models as models
import tiny_models  # noqa: F401  (registers tiny_mlp, a model without pre-activation features)
from conftest import ctkd_config, load
from ctkd import trainer
from ctkd.config import ConfigError, LossConfig
from ctkd.datasets.loader import Batch
from ctkd.distiller import Distiller, build_distiller, measure_setup
from ctkd.methods import MethodSetup, StepContext, TeacherOutput
from ctkd.methods.base import StepInputs
from ctkd.methods.ofd import OFD, bn_margin, locate_stage_batchnorms, partial_l2
from ctkd.networks import check_preact_features
from ctkd.temperatures import FixedTemperature, GlobalTemperature

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny forwards: one thread is faster on a shared CPU

STEP = StepContext(epoch=1, step=0, grl_lambda=1.0)
TAU = torch.tensor(4.0)


def _randn(seed: int, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _randomise_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Distinct γ (some negative) and β in every BatchNorm, so a margin read from the wrong one shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
    return model


def _margin_reference(gamma: list[float], beta: list[float]) -> list[float]:
    """The paper's margin E[x | x < 0] = β − s·φ(β/s)/Φ(−β/s), s = |γ|; −3s where Φ(−β/s) ≤ 0.001; Φ via math.erf."""
    out = []
    for g, b in zip(gamma, beta):
        s = abs(g)
        if s == 0:  # a constant channel: β itself if negative (ours; the authors' code divides by zero)
            out.append(min(b, 0.0))
            continue
        cdf = 0.5 * (1 + math.erf((-b / s) / math.sqrt(2)))
        pdf = math.exp(-((b / s) ** 2) / 2) / math.sqrt(2 * math.pi)
        out.append(b - s * pdf / cdf if cdf > 0.001 else -3 * s)
    return out


# ------------------------------------------------------------------------------------------------ margin
# (torch.allclose rather than torch.testing.assert_close: the latter's first call imports for over a second)
GAMMA = [1.0, -0.7, 2.0, 0.5, 1.0, 0.3, 0.0, 0.0, 1.5]
BETA = [0.0, 0.4, -1.0, 0.2, 4.0, 1.0, -0.6, 0.8, 4.6]  # 4/1, 1/0.3: P(x<0) ≤ 0.001; 4.6/1.5: P just above


def test_margin_matches_the_float64_gaussian_formula() -> None:
    got = bn_margin(torch.tensor(GAMMA), torch.tensor(BETA))
    assert got.dtype == torch.float32 and got.shape == (len(GAMMA),)
    expected = torch.tensor(_margin_reference(GAMMA, BETA), dtype=torch.float64)
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-7), (got, expected)
    assert got[4].item() == pytest.approx(-3.0) and got[5].item() == pytest.approx(-0.9)  # the −3|γ| fallback
    assert bool((got <= 0).all())


@pytest.mark.parametrize(("gamma", "beta"), [(1.0, 0.0), (-0.7, 0.4), (2.0, -1.0), (1.5, 4.6)])
def test_margin_is_the_mean_of_the_negative_part_by_numerical_integration(gamma: float, beta: float) -> None:
    """The closed form equals ∫_{x<0} x p(x) dx / ∫_{x<0} p(x) dx of N(β, γ²), integrated numerically in float64."""
    s = abs(gamma)
    x = torch.linspace(beta - 12 * s, 0.0, 100_001, dtype=torch.float64)
    density = torch.exp(-0.5 * ((x - beta) / s) ** 2)
    expected = (torch.trapezoid(x * density, x) / torch.trapezoid(density, x)).item()
    assert bn_margin(torch.tensor([gamma]), torch.tensor([beta])).item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------------ which BatchNorm
def _authors_batchnorms(name: str, model: nn.Module) -> list[nn.BatchNorm2d]:
    """mdistiller's get_bn_before_relu for each family (ShuffleV1: its last unit's bn3, where mdistiller raises)."""
    if name.startswith("resnet"):
        return [stage[-1].bn2 for stage in (model.layer1, model.layer2, model.layer3)]
    if name.startswith("wrn"):
        return [model.block2.layer[0].bn1, model.block3.layer[0].bn1, model.bn1]
    if name.startswith("vgg"):
        return [model.block1[-1], model.block2[-1], model.block3[-1], model.block4[-1]]
    if name == "MobileNetV2":
        return [model.blocks[g][-1].conv[-1] for g in (1, 2, 4, 6)]
    return [stage[-1].bn3 for stage in (model.layer1, model.layer2, model.layer3)]


@pytest.mark.parametrize("name", [
    "resnet14",
    "resnet8",  # one block per stage: its projection shortcut's BN also reaches the sum; the residual branch wins
    "wrn_16_2",
    "vgg8",
    "MobileNetV2",
    "ShuffleV1",
])
def test_the_located_batchnorm_of_each_stage_is_the_authors_bn_before_relu(name: str) -> None:
    torch.manual_seed(0)
    model = _randomise_batchnorms(models.build_model(name, num_classes=10)).eval()
    with torch.no_grad():
        stages = len(model.forward_with_features(torch.zeros(2, 3, 32, 32), preact=True)[0]) - 2
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    located = locate_stage_batchnorms(model, range(1, stages + 1))
    expected = _authors_batchnorms(name, model)
    assert len(located) == len(expected) == stages
    for (gamma, beta), bn in zip(located, expected):
        assert torch.equal(gamma, bn.weight.detach()) and torch.equal(beta, bn.bias.detach())
    assert model.training  # mode and every parameter and statistic as they were
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_shufflev2_teacher_is_refused_naming_the_method_and_model() -> None:
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match=r"method ofd: 58 of the 116 channels .*ShuffleNetV2"):
        locate_stage_batchnorms(models.build_model("ShuffleV2", num_classes=10), [1])


# ------------------------------------------------------------------------------------------------ loss
# Student: stem, four stages (the teacher has three: the last three pair), pooled. resnet8 teacher maps are 32², 16²,
# 8²: pair 1 pools the teacher 32² → 16², pair 2 has equal sizes, pair 3 pools 8² → 4².
STUDENT = [(3, 16, 16), (5, 16, 16), (6, 16, 16), (7, 16, 16), (4, 4, 4), (4,)]
TEACHER = [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)]
BATCH = 3


@functools.cache
def _built_method(weight: float) -> OFD:
    torch.manual_seed(0)
    teacher = _randomise_batchnorms(models.build_model("resnet8", num_classes=10))
    setup = MethodSetup(STUDENT, TEACHER, 10, torch.zeros(0, dtype=torch.long), seed=0, teacher=teacher)
    return OFD(nn.Linear(2, 10), FixedTemperature(4.0), options=OFD.Options(weight=weight), loss=LossConfig(),
               setup=setup)


def _loss_method(weight: float = 0.3) -> OFD:
    """OFD around a stand-in student, with a resnet8 teacher and random negative margins (overwritten)."""
    method = copy.deepcopy(_built_method(weight))
    with torch.no_grad():
        for i, margin in enumerate(method.margins()):
            margin.copy_(-0.2 - torch.rand(margin.shape, generator=torch.Generator().manual_seed(30 + i)))
        for i, conn in enumerate(method.connectors):  # BN affine away from 1/0 so a mix-up shows
            conn[1].weight.copy_(1 + 0.3 * _randn(40 + i, conn[1].weight.shape[0]))
            conn[1].bias.copy_(0.3 * _randn(50 + i, conn[1].bias.shape[0]))
    return method


def _features(shapes: list[tuple[int, ...]], seed: int) -> list[Tensor]:
    return [_randn(seed + i, BATCH, *shape) for i, shape in enumerate(shapes)]


def _block_mean(x: Tensor, size: int) -> Tensor:
    """Mean of non-overlapping blocks down to size×size (written out, not adaptive_avg_pool2d)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, size, h // size, size, w // size).mean(dim=(3, 5))


def _reference(method: OFD, student: list[Tensor], teacher: list[Tensor], weight: float) -> Tensor:
    """β·Σ_i feat_loss(r_i(s_i), pool(t_i), m_i)/2^(n−i−1) in float64: the connector as a channel matrix product
    and a training-mode BN (biased batch variance); mdistiller's three cases of feat_loss; mean over the batch."""
    total = torch.zeros((), dtype=torch.float64)
    pairs = list(zip(student[1:-1][-3:], teacher[1:-1], method.connectors, method.margins()))
    for i, (s, t, conn, margin) in enumerate(pairs):
        w = conn[0].weight.detach().double()[:, :, 0, 0]
        y = torch.einsum("oc,bchw->bohw", w, s)
        mean, var = y.mean(dim=(0, 2, 3), keepdim=True), y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        y = (y - mean) / torch.sqrt(var + conn[1].eps)
        y = y * conn[1].weight.detach().double().view(1, -1, 1, 1) + conn[1].bias.detach().double().view(1, -1, 1, 1)
        t = _block_mean(t.double(), y.shape[-1])
        m = margin.double().view(1, -1, 1, 1)
        loss = ((y - m) ** 2 * ((y > m) & (t <= m)) + (y - t) ** 2 * ((y > t) & (t > m) & (t <= 0))
                + (y - t) ** 2 * (t > 0))
        total = total + loss.mean(dim=0).sum() / 2 ** (len(pairs) - i - 1)
    return weight * total


def _step(student: list[Tensor], teacher: list[Tensor]) -> StepInputs:
    batch = Batch(torch.zeros(BATCH, 1), torch.zeros(BATCH, dtype=torch.long), torch.arange(BATCH), BATCH)
    return StepInputs(batch, None, student, TeacherOutput(None, teacher), TAU, STEP, None)


def test_loss_and_student_gradients_match_float64_feat_loss() -> None:
    method = _loss_method(weight=0.3)
    student = [f.requires_grad_() for f in _features(STUDENT, 0)]
    teacher = [f.requires_grad_() for f in _features(TEACHER, 10)]
    got = method.loss_terms(_step(student, teacher))
    assert list(got) == ["loss_ofd"] and got["loss_ofd"].dtype == torch.float32
    got["loss_ofd"].backward()
    student64 = [f.detach().double().requires_grad_() for f in student]
    expected = _reference(method, student64, [f.detach() for f in teacher], weight=0.3)
    expected.backward()
    assert got["loss_ofd"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert student[0].grad is None and student[1].grad is None  # stem and the unpaired first stage
    for f, f64 in zip(student[2:5], student64[2:5]):
        assert torch.allclose(f.grad.double(), f64.grad, rtol=1e-4, atol=1e-7)
    assert all(f.grad is None for f in teacher)  # the teacher's features are targets only


def test_every_case_of_the_partial_l2_occurs_in_the_fixed_inputs() -> None:
    """Control for the test above: the margin, the skipped region and both squared cases all carry weight."""
    method = _loss_method()
    with torch.no_grad():
        s = method.connectors[2](_features(STUDENT, 0)[4])
    t, m = _block_mean(_features(TEACHER, 10)[3], 4), method.margins()[2].view(1, -1, 1, 1)
    cases = [(s > m) & (t <= m), (s > t) & (t > m) & (t <= 0), t > 0, (s <= torch.maximum(t, m)) & (t <= 0)]
    assert all(case.sum() > 20 for case in cases), [int(case.sum()) for case in cases]


def test_partial_l2_is_zero_when_the_student_matches_or_undershoots_a_non_positive_teacher() -> None:
    t, m = _randn(0, 4, 6, 3, 3), -0.5 - torch.rand(6, generator=torch.Generator().manual_seed(1))
    assert partial_l2(t, t, m).item() == 0.0  # student equals teacher
    target = torch.maximum(t, m.view(1, -1, 1, 1))
    assert partial_l2(target, t, m).item() == 0.0  # student equals the margin-ReLU'd teacher
    below = torch.where(target <= 0, target - _randn(2, *t.shape).abs(), target)
    assert partial_l2(below, t, m).item() == 0.0  # below a non-positive target: skipped (the partial L2)
    above = torch.where(target <= 0, target + 0.1, target)
    assert partial_l2(above, t, m).item() == pytest.approx(0.01 * int((target <= 0).sum()) / 4, rel=1e-4)


def test_the_loss_does_not_depend_on_tau() -> None:
    method = _loss_method()
    tau = torch.tensor(4.0, requires_grad=True)
    step = _step(_features(STUDENT, 0), _features(TEACHER, 10))
    step = StepInputs(step.batch, None, step.student_features, step.teacher, tau, STEP, None)
    loss = method.loss_terms(step)["loss_ofd"]
    assert torch.autograd.grad(loss, tau, allow_unused=True)[0] is None  # OFD uses no τ (uses_tau is False)
    assert not OFD.uses_tau and OFD.preact and OFD.features


# ------------------------------------------------------------------------------------------------ heads and options
def test_connectors_are_initialised_as_the_authors_and_margins_are_fixed_buffers() -> None:
    method = _loss_method()
    assert [tuple(c[0].weight.shape) for c in method.connectors] == [(16, 6, 1, 1), (32, 7, 1, 1), (64, 4, 1, 1)]
    keys = {k for k in method.state_dict() if not k.startswith(("student.", "temperature."))}
    assert {k for k in keys if k.startswith("margin")} == {"margin_0", "margin_1", "margin_2"}
    assert not any(name.startswith("margin") for name, _ in method.named_parameters())
    teacher = _randomise_batchnorms(models.build_model("resnet8", num_classes=10))
    wide = OFD(nn.Linear(2, 10), FixedTemperature(4.0), options=OFD.Options(connector_kernel=3), loss=LossConfig(),
               setup=MethodSetup([(3, 8, 8), (64, 8, 8), (4,)], TEACHER, 10, torch.zeros(0), seed=0, teacher=teacher))
    # one student stage: it pairs with the teacher's last, and so does the margin (mdistiller takes the first BN)
    deepest = teacher.layer3[-1].bn2
    assert torch.equal(wide.margins()[0], bn_margin(deepest.weight, deepest.bias))
    conv, bn = wide.connectors[0]
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.bias is None
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.05)  # N(0, 2/(k²·C_t))
    assert torch.equal(bn.weight, torch.ones(64)) and torch.equal(bn.bias, torch.zeros(64))
    with pytest.raises(ConfigError, match="connector_kernel"):
        OFD.Options(connector_kernel=2)


def test_option_defaults_follow_mdistiller() -> None:
    options = OFD.Options()
    assert (options.name, options.weight, options.connector_kernel) == ("ofd", 1e-3, 1)
    assert OFD.min_samples_per_rank == 2 and OFD.paper == "Heo et al., ICCV 2019"


# ------------------------------------------------------------------------------------------------ zoo pairs
def _real_distiller(student_name: str, teacher_name: str, batch: int = 4) -> tuple[Distiller, Batch]:
    torch.manual_seed(0)
    student = models.build_model(student_name, num_classes=10)
    teacher = models.build_model(teacher_name, num_classes=10)
    setup = measure_setup(student, teacher, image_shape=(3, 32, 32), num_classes=10,
                          train_targets=torch.zeros(0, dtype=torch.long), seed=0, features=True, preact=True)
    distiller = build_distiller(OFD.Options(), student=student, teacher=teacher, temperature=GlobalTemperature(),
                                loss=LossConfig(), setup=setup)
    distiller.train()
    return distiller, Batch(_randn(1, batch, 3, 32, 32), torch.arange(batch) % 10, torch.arange(batch), batch)


@pytest.mark.slow
@pytest.mark.parametrize("pair", [("resnet8", "resnet14"), ("wrn_16_2", "wrn_40_2"), ("vgg8", "vgg13")])
def test_one_step_on_a_zoo_pair_is_finite_and_moves_student_and_connectors(pair: tuple[str, str]) -> None:
    distiller, batch = _real_distiller(*pair)
    method = distiller.unwrapped
    margins = [m.clone() for m in method.margins()]
    teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    ofd_term = distiller(batch, STEP).losses["loss_ofd"]
    assert torch.isfinite(ofd_term) and ofd_term > 0
    ofd_term.backward()
    assert all(p.grad is None for p in method.temperature.parameters())  # τ sees no gradient from OFD
    method.zero_grad()
    before = {name: p.detach().clone() for name, p in method.named_parameters()}
    out = distiller(batch, STEP)
    assert all(torch.isfinite(v) for v in out.losses.values())
    sum(out.losses.values()).backward()
    assert all(p.grad is None for p in distiller.teacher.parameters())
    torch.optim.SGD(method.parameters(), lr=0.05).step()
    moved = {name for name, p in method.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert {f"connectors.{i}.{j}.weight" for i in range(len(method.connectors)) for j in (0, 1)} <= moved
    assert any(name.startswith("student.") for name in moved)
    assert method.temperature.raw.grad is not None  # τ learns through the α·KD(τ) term only
    assert all(torch.equal(a, b) for a, b in zip(margins, method.margins()))
    assert all(torch.equal(teacher_before[k], v) for k, v in distiller.teacher.state_dict().items())


# ------------------------------------------------------------------------------------------------ errors
# Every CIFAR zoo model has pre-activation features; the test-only tiny_mlp and torchvision's models do not (slow:
# importing torchvision alone takes over a second).
TORCHVISION = pytest.mark.slow
NO_PREACT = [("student", "tiny_mlp"), ("teacher", "tiny_mlp"),
             pytest.param("student", "torchvision.resnet18", marks=TORCHVISION),
             pytest.param("teacher", "torchvision.resnet18", marks=TORCHVISION)]


def _without_preact(name: str) -> nn.Module:
    """The named model, on the meta device (only its class's supports_preact matters)."""
    with torch.device("meta"):
        return models.build_model(name, num_classes=10)


@pytest.mark.parametrize(("section", "name"), NO_PREACT)
def test_a_network_without_preact_features_is_refused_before_training(
    tmp_path: Path, teacher_file: Path, section: str, name: str
) -> None:
    data = ctkd_config(tmp_path, teacher_file, epochs=1, **{section: {"name": name}})
    data["method"] = {"name": "ofd"}
    cfg = load(data, tmp_path)
    refused = _without_preact(name)
    zoo = models.build_model("resnet8", num_classes=10)
    student, teacher = (refused, zoo) if section == "student" else (zoo, refused)
    with pytest.raises(ConfigError, match=rf"method ofd .*{section}\.name {re.escape(name)}"):
        check_preact_features(cfg, OFD, student, teacher)  # what build_networks calls before measuring anything
    setup = MethodSetup([(3, 8, 8), (64, 8, 8), (4,)], [(3, 8, 8), (64, 8, 8), (4,)], 10, torch.zeros(0), seed=0,
                        teacher=refused)
    with pytest.raises(ConfigError, match="method ofd .*teacher"):  # also when the method is built directly
        OFD(nn.Linear(2, 10), FixedTemperature(4.0), options=OFD.Options(), loss=LossConfig(), setup=setup)


@pytest.mark.slow  # a run's start-up (imports, dataset) takes seconds even when it stops at the check
@pytest.mark.parametrize("name", ["tiny_mlp", "torchvision.resnet18"])
def test_a_run_with_such_a_student_fails_before_training(tmp_path: Path, teacher_file: Path, name: str) -> None:
    data = ctkd_config(tmp_path, teacher_file, epochs=1, student={"name": name})
    data["method"] = {"name": "ofd"}
    cfg = load(data, tmp_path)
    with pytest.raises(ConfigError, match=rf"method ofd .*student\.name {re.escape(name)}"):
        trainer.run(cfg)
    assert not (Path(cfg.output_dir) / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_one_epoch_run_logs_a_finite_ofd_loss_and_checkpoints_the_unfolded_margins(tmp_path: Path) -> None:
    """The teacher's BatchNorms are folded into its convolutions for the run (runtime.fold_teacher_bn); the margins
    come from the file's unfolded ones: those of the last block of each stage, layerK.1.bn2 in resnet14."""
    torch.manual_seed(1)
    teacher = _randomise_batchnorms(models.build_model("resnet14", num_classes=10), seed=3).state_dict()
    distinct_teacher = tmp_path / "teacher" / "ckpt_epoch_240.pth"
    distinct_teacher.parent.mkdir()
    torch.save({"epoch": 240, "model": teacher, "accuracy": torch.tensor(71.0), "optimizer": {}}, distinct_teacher)
    data = ctkd_config(tmp_path, distinct_teacher, epochs=1, runtime={"fold_teacher_bn": True})
    data["method"] = {"name": "ofd"}
    cfg = load(data, tmp_path)
    trainer.run(cfg)
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and math.isfinite(records[0]["train_loss_ofd"]) and records[0]["train_loss_ofd"] > 0
    saved = torch.load(Path(cfg.output_dir) / "last.pth", weights_only=True)["trainable"]
    for i in range(3):
        expected = bn_margin(teacher[f"layer{i + 1}.1.bn2.weight"], teacher[f"layer{i + 1}.1.bn2.bias"])
        assert torch.equal(saved[f"margin_{i}"], expected), i
