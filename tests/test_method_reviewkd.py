"""ReviewKD (Chen et al., CVPR 2021): ABF and HCL against float64 formulas, the derived per-pair tables against
mdistiller's configs, the warm-up, where gradients go, one step with zoo and torchvision models, an end-to-end run.

The reference formulas are written from the paper and the authors' code (mdistiller/distillers/ReviewKD.py, the same
as dvlab-research/ReviewKD CIFAR-100/model/reviewkd.py): ABF = BN(1×1 conv) fused with the nearest-upsampled deeper
residual by two sigmoid attention maps (1×1 conv with bias over both), nearest resize to the teacher's size, BN(3×3
conv, padding 1); HCL = (MSE + Σ 2^-k·MSE of average pools 4, 2, 1 below the map size) / Σ weights.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import ctkd.models as models
import tiny_models  # noqa: F401  (registers tiny_mlp, a model without pre-activation features)
from conftest import ctkd_config, load, one_epoch_record, zoo_distiller
from ctkd.config import ConfigError, LossConfig
from ctkd.datasets.loader import Batch
from ctkd.distiller import Distiller, measure_setup
from ctkd.methods import MethodSetup, StepContext, TeacherOutput
from ctkd.methods.base import StepInputs
from ctkd.methods.reviewkd import ABF, ReviewKD, ReviewPlan, hcl_loss
from ctkd.temperatures import FixedTemperature

pytestmark = pytest.mark.usefixtures("single_thread")
STEP = StepContext(epoch=40, step=0, grl_lambda=1.0)  # past the warm-up: factor 1
TAU = torch.tensor(4.0)


def _randn(seed: int, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ float64 formulas
def _nearest(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest resize written out: output pixel i reads input pixel floor(i·in/out)."""
    rows = torch.arange(size[0]) * x.shape[-2] // size[0]
    cols = torch.arange(size[1]) * x.shape[-1] // size[1]
    return x[:, :, rows][:, :, :, cols]


def _bn_train(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    """Training-mode BatchNorm: batch statistics over (B, H, W), biased variance, then the affine."""
    mean, var = x.mean(dim=(0, 2, 3), keepdim=True), x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    weight, bias = (p.detach().double()[None, :, None, None] for p in (bn.weight, bn.bias))
    return (x - mean) / torch.sqrt(var + bn.eps) * weight + bias


def _conv3x3(x: Tensor, weight: Tensor) -> Tensor:
    """3×3 convolution with zero padding 1 as nine shifted channel products."""
    h, w = x.shape[-2:]
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    return sum(torch.einsum("oc,bchw->bohw", weight[:, :, i, j], padded[:, :, i:i + h, j:j + w])
               for i in range(3) for j in range(3))


def _abf_reference(abf: ABF, x: Tensor, residual: Tensor | None, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """ABF in float64 (inputs already float64), as the docstring of this module describes it."""
    y = _bn_train(torch.einsum("oc,bchw->bohw", abf.conv1[0].weight.detach().double()[:, :, 0, 0], x), abf.conv1[1])
    if abf.att_conv is not None:
        r = _nearest(residual, tuple(y.shape[-2:]))
        w, b = abf.att_conv[0].weight.detach().double()[:, :, 0, 0], abf.att_conv[0].bias.detach().double()
        z = torch.sigmoid(torch.einsum("oc,bchw->bohw", w, torch.cat([y, r], 1)) + b[None, :, None, None])
        y = y * z[:, :1] + r * z[:, 1:]
    y = _nearest(y, size)
    return _bn_train(_conv3x3(y, abf.conv2[0].weight.detach().double()), abf.conv2[1]), y


def _block_mean(x: Tensor, size: int) -> Tensor:
    """Average of non-overlapping blocks down to size×size (not adaptive_avg_pool2d)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, size, h // size, size, w // size).mean(dim=(3, 5))


# pool sizes and weights per map side: the authors' hcl_loss skips pools ≥ the side; weights halve per pool used
HCL_WEIGHTS = {16: [(4, 0.5), (2, 0.25), (1, 0.125)], 8: [(4, 0.5), (2, 0.25), (1, 0.125)],
               4: [(2, 0.5), (1, 0.25)], 2: [(1, 0.5)], 1: []}


def _hcl_reference(fs: Tensor, ft: Tensor) -> Tensor:
    """HCL of one level in float64 from the table above."""
    pools = HCL_WEIGHTS[fs.shape[-1]]
    loss = ((fs - ft) ** 2).mean() + sum(w * ((_block_mean(fs, k) - _block_mean(ft, k)) ** 2).mean() for k, w in pools)
    return loss / (1 + sum(w for _, w in pools))


def _review_reference(method: ReviewKD, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """Σ_levels HCL of the float64 ABF chain, deepest level first (levels = features[1:], pooled as 1×1)."""
    s_levels = [*student[1:-1], student[-1][:, :, None, None]]
    t_levels = [*teacher[1:-1], teacher[-1][:, :, None, None]]
    residual, total = None, 0.0
    for x, t, abf in zip(s_levels[::-1], t_levels[::-1], method.abfs):
        prediction, residual = _abf_reference(abf, x, residual, tuple(t.shape[-2:]))
        total = total + _hcl_reference(prediction, t)
    return total


# ------------------------------------------------------------------------------------------------ ABF and HCL
def _randomise(module: nn.Module, seed: int) -> None:
    """Non-trivial BN affines and attention biases, so a dropped affine or bias shows in the comparison."""
    with torch.no_grad():
        for i, m in enumerate(module.modules()):
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.3 * _randn(seed + i, m.num_features))
                m.bias.copy_(0.3 * _randn(seed + 100 + i, m.num_features))
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.copy_(_randn(seed + 200 + i, m.out_channels))


@pytest.mark.parametrize("student_size,out_size", [(4, 8), (4, 4)])
def test_abf_and_its_input_gradients_match_float64(student_size: int, out_size: int) -> None:
    torch.manual_seed(0)
    abf = ABF(5, 6, 7, fuse=True).train()
    _randomise(abf, 1)
    x = _randn(2, 3, 5, student_size, student_size).requires_grad_()
    residual = _randn(3, 3, 6, 2, 2).requires_grad_()  # the deeper level's fused map: nearest-upsampled ×2
    out, fused = abf(x, residual, (out_size, out_size))
    x64, r64 = x.detach().double().requires_grad_(), residual.detach().double().requires_grad_()
    ref_out, ref_fused = _abf_reference(abf, x64, r64, (out_size, out_size))
    assert out.shape == (3, 7, out_size, out_size) and fused.shape == (3, 6, out_size, out_size)
    assert torch.allclose(out.double(), ref_out, atol=1e-5) and torch.allclose(fused.double(), ref_fused, atol=1e-5)
    probe = _randn(4, *out.shape)  # a random linear functional of the output, so every output element counts
    (out * probe).sum().backward()
    (ref_out * probe.double()).sum().backward()
    for got, expected in ((x.grad, x64.grad), (residual.grad, r64.grad)):
        assert (got.double() - expected).abs().max() < 1e-5 * expected.abs().max()


def test_the_deepest_abf_does_not_fuse() -> None:
    abf = ABF(5, 6, 7, fuse=False).train()
    assert abf.att_conv is None
    out, _ = abf(_randn(0, 3, 5, 1, 1), None, (1, 1))
    assert torch.allclose(out.double(), _abf_reference(abf, _randn(0, 3, 5, 1, 1).double(), None, (1, 1))[0],
                          atol=1e-5)


@pytest.mark.parametrize("side", [16, 8, 4, 2, 1])
def test_hcl_and_its_gradient_match_float64(side: int) -> None:
    fs, ft = _randn(0, 3, 4, side, side).requires_grad_(), _randn(1, 3, 4, side, side)
    loss = hcl_loss(fs, ft)
    fs64 = fs.detach().double().requires_grad_()
    expected = _hcl_reference(fs64, ft.double())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    expected.backward()
    assert (fs.grad.double() - fs64.grad).abs().max() < 1e-6 * fs64.grad.abs().max()
    assert hcl_loss(ft, ft).item() == 0.0  # the student's map equal to the teacher's: nothing to learn


# ------------------------------------------------------------------------------------------------ the whole term
# Stem, three stage maps, pooled vector. Teacher maps are larger at the two shallow levels (resized ×2, as
# mdistiller's OUT_SHAPES for ShuffleNet students), equal at the third; the residual is upsampled ×2 at two levels.
STUDENT = [(3, 8, 8), (4, 8, 8), (6, 4, 4), (5, 2, 2), (8,)]
TEACHER = [(3, 16, 16), (5, 16, 16), (7, 8, 8), (6, 2, 2), (9,)]


def _setup(student: list[tuple[int, ...]], teacher: list[tuple[int, ...]]) -> MethodSetup:
    return MethodSetup(student, teacher, 10, torch.zeros(0, dtype=torch.long), seed=0)


def _method(options: ReviewKD.Options, student: list = STUDENT, teacher: list = TEACHER) -> ReviewKD:
    """ReviewKD around a stand-in student (its loss terms are called with given features)."""
    method = ReviewKD(nn.Linear(2, 10), FixedTemperature(4.0), options=options, loss=LossConfig(),
                      setup=_setup(student, teacher))
    _randomise(method, 7)
    return method.train()


def _features(shapes: list[tuple[int, ...]], seed: int, batch: int = 3) -> list[Tensor]:
    return [_randn(seed + i, batch, *shape) for i, shape in enumerate(shapes)]


def _terms(method: ReviewKD, student: list[Tensor], teacher: list[Tensor], ctx: StepContext = STEP) -> Tensor:
    batch = Batch(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), torch.arange(3), 3)
    terms = method.loss_terms(StepInputs(batch, None, student, TeacherOutput(None, teacher), TAU, ctx, None))
    assert list(terms) == ["loss_reviewkd"]
    return terms["loss_reviewkd"]


def test_review_loss_and_student_gradients_match_float64() -> None:
    """weight 0.7 (any), max_mid_channels 6 < the student's pooled width 8: mid = min(cap, 8) = 6 (mdistiller)."""
    torch.manual_seed(0)
    method = _method(ReviewKD.Options(weight=0.7, max_mid_channels=6))
    assert [abf.conv1[0].out_channels for abf in method.abfs] == [6] * 4
    assert [abf.att_conv is None for abf in method.abfs] == [True, False, False, False]  # deepest first
    student = [f.requires_grad_() for f in _features(STUDENT, 0)]
    teacher = _features(TEACHER, 10)
    loss = _terms(method, student, teacher)
    student64 = [f.detach().double().requires_grad_() for f in student]
    expected = 0.7 * _review_reference(method, student64, [t.double() for t in teacher])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    expected.backward()
    assert student[0].grad is None  # the stem is not reviewed
    # 1e-4: float32 rounding through BatchNorms over 3 samples (the module run in float64 agrees to 1e-14)
    for got, ref in zip(student[1:], student64[1:]):
        assert (got.grad.double() - ref.grad).abs().max() < 1e-4 * ref.grad.abs().max()


def test_warmup_factor_grows_linearly_from_epoch_one() -> None:
    method = _method(ReviewKD.Options())  # mdistiller: WARMUP_EPOCHS 20, epochs counted from 1
    assert [method.warmup_factor(e) for e in (1, 10, 19, 20, 21, 240)] == [0.05, 0.5, 0.95, 1.0, 1.0, 1.0]
    assert _method(ReviewKD.Options(warmup_epochs=0)).warmup_factor(1) == 1.0
    student, teacher = _features(STUDENT, 0), _features(TEACHER, 10)
    first = _terms(method, student, teacher, StepContext(epoch=1, step=0, grl_lambda=1.0))
    assert first.item() == pytest.approx(_terms(method, student, teacher).item() / 20, rel=1e-6)


def test_option_defaults_are_mdistillers() -> None:
    options = ReviewKD.Options()
    assert (options.name, options.weight, options.warmup_epochs, options.max_mid_channels) == ("reviewkd", 1.0, 20, 512)
    with pytest.raises(ConfigError, match="warmup_epochs"):
        ReviewKD.Options(warmup_epochs=1.5)


# ------------------------------------------------------------------------------------------------ derived tables
# mdistiller's REVIEWKD tables (IN_CHANNELS, OUT_CHANNELS, SHAPES, OUT_SHAPES): resnet32x4 → resnet8x4 runs on the
# defaults of mdistiller/engine/cfg.py (configs/cifar100/reviewkd.yaml sets none); the other CIFAR pairs from
# configs/cifar100/reviewkd/{res56_res20,wrn40_2_wrn_16_2,res32x4_shuv1,vgg13_vgg8}.yaml (stored in the mdistiller
# fork ZaberKo/GDKD; the same as build_review_kd of dvlab-research/ReviewKD); ImageNet ResNet34 → ResNet18 from
# mdistiller configs/imagenet/r34_r18/reviewkd.yaml (224×224).
MDISTILLER_TABLES = [
    ("resnet56", "resnet20", 32, [16, 32, 64, 64], [16, 32, 64, 64], [1, 8, 16, 32], [1, 8, 16, 32]),
    ("resnet32x4", "resnet8x4", 32, [64, 128, 256, 256], [64, 128, 256, 256], [1, 8, 16, 32], [1, 8, 16, 32]),
    ("wrn_40_2", "wrn_16_2", 32, [32, 64, 128, 128], [32, 64, 128, 128], [1, 8, 16, 32], [1, 8, 16, 32]),
    ("resnet32x4", "ShuffleV1", 32, [240, 480, 960, 960], [64, 128, 256, 256], [1, 4, 8, 16], [1, 8, 16, 32]),
    ("vgg13", "vgg8", 32, [128, 256, 512, 512, 512], [128, 256, 512, 512, 512], [1, 4, 4, 8, 16], [1, 4, 4, 8, 16]),
    pytest.param("torchvision.resnet34", "torchvision.resnet18", 224, [64, 128, 256, 512, 512],
                 [64, 128, 256, 512, 512], [1, 7, 14, 28, 56], [1, 7, 14, 28, 56], marks=pytest.mark.slow),
]


def _measured_setup(teacher: str, student: str, side: int) -> tuple[MethodSetup, nn.Module]:
    """(feature shapes of the pair as a run measures them, the student); ImageNet sizes on the meta device (shapes
    without arithmetic: a CPU forward at 224×224 takes seconds)."""
    with torch.device("meta" if side > 32 else "cpu"):
        nets = [models.build_model(name, num_classes=10) for name in (student, teacher)]
    setup = measure_setup(*nets, image_shape=(3, side, side), num_classes=10,
                          train_targets=torch.zeros(0, dtype=torch.long), seed=0, features=True)
    return setup, nets[0]


@pytest.mark.parametrize("teacher,student,side,in_ch,out_ch,shapes,out_shapes", MDISTILLER_TABLES)
def test_plan_from_measured_shapes_equals_mdistillers_table(teacher: str, student: str, side: int, in_ch: list,
                                                            out_ch: list, shapes: list, out_shapes: list) -> None:
    setup, _ = _measured_setup(teacher, student, side)
    plan = ReviewPlan.from_shapes(setup.student_feature_shapes, setup.teacher_feature_shapes, 512)
    assert list(plan.in_channels) == in_ch and list(plan.out_channels) == out_ch
    assert [(s, s) for s in shapes] == list(plan.shapes) and [(s, s) for s in out_shapes] == list(plan.out_shapes)
    assert plan.mid_channels == min(512, in_ch[-1])  # mdistiller: min(512, IN_CHANNELS[-1])


def test_networks_that_cannot_be_reviewed_raise_config_errors() -> None:
    setup, student = _measured_setup("resnet14", "torchvision.resnet18", 32)  # 5 levels (four stages) against 4
    levels = r"reviewkd pairs the levels.*student \(ResNet\) has 5.*teacher \(CifarResNet\) has 4"
    with pytest.raises(ConfigError, match=levels):
        ReviewKD(student, FixedTemperature(4.0), options=ReviewKD.Options(), loss=LossConfig(), setup=setup)
    with pytest.raises(ConfigError, match=r"method reviewkd needs stage outputs as \(C, H, W\) maps"):
        _method(ReviewKD.Options(), student=[(3, 8, 8), (12, 5), (8,)])  # token features, not maps
    with pytest.raises(ConfigError, match="reviewkd needs stage outputs"):
        _method(ReviewKD.Options(), teacher=[(3, 8, 8), (9,)])  # no stage output between stem and pooled vector


# ------------------------------------------------------------------------------------------------ real networks
def _real_distiller(student: str, teacher: str, batch: int = 4) -> tuple[Distiller, Batch]:
    """A ReviewKD distiller of zoo or torchvision models, 10 classes, one random batch of 32×32 images."""
    return zoo_distiller(ReviewKD.Options(), student, teacher, batch=batch)


def test_gradients_reach_student_and_every_abf_never_the_teacher_and_tau_only_through_kd() -> None:
    distiller, batch = _real_distiller("resnet8", "resnet14")
    method = distiller.unwrapped
    out = distiller(batch, STEP)
    out.losses["loss_reviewkd"].backward(retain_graph=True)
    for name, p in method.named_parameters():
        if name.startswith(("temperature.", "student.fc.")):
            assert p.grad is None, name  # the term uses neither τ nor the logits (the pooled vector is fc's input)
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in distiller.teacher.parameters())
    out.losses["loss_kd"].backward()  # the learned τ gets its gradient from the KD term (α > 0)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.temperature.parameters())


def _one_step_moves_student_and_heads(student: str, teacher: str) -> None:
    distiller, batch = _real_distiller(student, teacher)
    method = distiller.unwrapped
    before = {k: v.detach().clone() for k, v in method.named_parameters()}
    teacher_before = [p.detach().clone() for p in distiller.teacher.parameters()]
    optimizer = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
    out = distiller(batch, STEP)
    assert all(torch.isfinite(v) for v in out.losses.values()), out.losses
    sum(out.losses.values()).backward()
    optimizer.step()
    moved = {k for k, v in method.named_parameters() if not torch.equal(v.detach(), before[k])}
    assert {k for k in before if k.startswith("abfs.")} <= moved  # every ABF parameter, attention convs included
    assert any(k.startswith("student.") for k in moved)
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, distiller.teacher.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("teacher,student", [("resnet56", "resnet20"), ("resnet32x4", "resnet8x4"),
                                             ("wrn_40_2", "wrn_16_2")])
def test_one_step_on_the_papers_pairs_moves_student_and_abfs(teacher: str, student: str) -> None:
    _one_step_moves_student_and_heads(student, teacher)


@pytest.mark.slow
def test_one_step_with_a_torchvision_resnet18_student() -> None:
    """Hooked torchvision features (four stages at 32×32: 8, 4, 2, 1) are maps: the review applies as is, against
    the CIFAR ResNet50's four pre-activation stages."""
    _one_step_moves_student_and_heads("torchvision.resnet18", "ResNet50")


def test_the_teacher_gives_pre_activation_maps_and_a_teacher_without_them_is_refused(tmp_path: Path,
                                                                                     teacher_file: Path) -> None:
    """The authors review against the teacher's maps before their final ReLU: negative values reach the loss."""
    from ctkd.networks import check_preact_features

    distiller, batch = _real_distiller("resnet8", "resnet14")
    targets = distiller.teacher_output(batch.images).features
    assert all((level < 0).any() for level in targets[1:-1])
    assert ReviewKD.preact_of("teacher") and not ReviewKD.preact_of("student")
    data = ctkd_config(tmp_path, teacher_file, epochs=1, teacher={"name": "tiny_mlp"})
    data["method"] = {"name": "reviewkd"}
    cfg = load(data, tmp_path)
    with torch.device("meta"):
        tiny = models.build_model("tiny_mlp", num_classes=10)
    with pytest.raises(ConfigError, match=r"method reviewkd .*teacher\.name tiny_mlp"):
        check_preact_features(cfg, ReviewKD, models.build_model("resnet8", num_classes=10), tiny)


@pytest.mark.slow
def test_one_epoch_ctkd_run_logs_a_finite_reviewkd_loss(tmp_path: Path, teacher_file: Path) -> None:
    # resnet14 → resnet8, learned global τ in the KD term
    record = one_epoch_record(tmp_path, teacher_file, {"name": "reviewkd", "weight": 5.0})
    assert record["train_loss_reviewkd"] > 0 and math.isfinite(record["train_loss_reviewkd"])
    assert all(math.isfinite(v) for k, v in record.items() if k.startswith("train_loss")), record
